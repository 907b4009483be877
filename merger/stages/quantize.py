"""The ``quantize`` stage: a smaller copy of a model for the device it is meant for.

gguf: llama.cpp's converter writes a bf16 (or Q8_0/F16/F32) GGUF file; llama.cpp's quantizer makes the
other types from the bf16 file. torchao: transformers quantizes the linear layers on load and saves a
safetensors directory that transformers loads directly (with torchao installed).
"""

import os
import shutil
from pathlib import Path

from merger import gguf_tools
from merger.errors import Cancelled, MergerError, Problem, format_loc
from merger.modelfiles import ModelInfo, inspect_dir
from merger.planning import InputRef, PlanContext, StageOutput, StagePlan, inspect_source, is_adapter_dir, resolve_input
from merger.progress import CancelCheck, ProgressEvent, Reporter
from merger.recipe import QuantizeStage

RELATION = "quantized"
SOFTWARE = ("llama-cpp-python", "torchao")  # versions recorded with the output and in its cache key
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
WRITTEN_BY_TRANSFORMERS = ("config.json", "generation_config.json", "model.safetensors.index.json", "README.md")


def summary(stage: QuantizeStage) -> str:
    spec = stage.quantize
    engine = "llama.cpp's converter and quantizer" if spec.format == "gguf" else "torchao through transformers"
    return f"`{spec.model}` quantized by merger to {spec.format} {spec.type} with {engine}."


def plan(stage: QuantizeStage, loc: tuple, context: PlanContext) -> tuple[StagePlan | None, list[Problem]]:
    spec = stage.quantize
    where = format_loc(loc + ("model",))
    problems: list[Problem] = []
    source = resolve_input(spec.model, where, context, problems)
    if source is None:
        return None, problems
    adapter = is_adapter_dir(source)
    info = None if adapter else inspect_source(source, context, where, problems)
    if adapter or (info is not None and info.is_adapter):
        problems.append(Problem(where, f"{spec.model!r} is an adapter; fold it into its base first (an adapters stage)"))
    details = {}
    if spec.format == "gguf":
        details["converter"] = _gguf_checks(info, source.kind == "stage", loc, context, problems)
    output = ModelInfo(path=Path(), architecture=info.architecture if info else None, model_type=info.model_type if info else None,
                       gguf_file=Path(gguf_name(stage)) if spec.format == "gguf" else None)
    return StagePlan(stage, [InputRef(where, spec.model, source, "base", RELATION)], output, details), problems


def gguf_name(stage: QuantizeStage) -> str:
    return f"{stage.name}.{stage.quantize.type}.gguf"


def _gguf_checks(info: ModelInfo | None, from_stage: bool, loc: tuple, context: PlanContext,
                 problems: list[Problem]) -> gguf_tools.Converter | None:
    try:
        converter = gguf_tools.find_converter(context.resolver.settings.tools_dir)
    except gguf_tools.GgufToolsMissing as exc:
        problems.append(Problem(format_loc(loc + ("format",)), str(exc)))
        return None
    if info is None:
        return converter
    if info.architecture not in converter.supported_architectures():
        problems.append(Problem(format_loc(loc + ("model",)),
                                f"architecture {info.architecture} has no GGUF converter in llama.cpp (llama-cpp-python {converter.llama_cpp_version})"))
    if not from_stage and not any((info.path / name).is_file() for name in TOKENIZER_FILES):
        problems.append(Problem(format_loc(loc + ("model",)), f"{info.path}: no tokenizer (tokenizer.model or tokenizer.json); a GGUF file needs one"))
    return converter


def run(plan: StagePlan, dirs: list[Path], out_dir: Path, work_dir: Path, report: Reporter, should_cancel: CancelCheck) -> StageOutput:
    stage: QuantizeStage = plan.stage
    if stage.quantize.format == "gguf":
        _run_gguf(plan, dirs[0], out_dir, work_dir, report, should_cancel)
        return StageOutput(plan.output_info.architecture, card_relation=RELATION, library="gguf")
    _run_torchao(stage, dirs[0], out_dir, report)
    return StageOutput(plan.output_info.architecture, card_relation=RELATION)


def _run_gguf(plan: StagePlan, source: Path, out_dir: Path, work_dir: Path, report: Reporter, should_cancel: CancelCheck) -> None:
    stage: QuantizeStage = plan.stage
    gguf_type = stage.quantize.type
    converter: gguf_tools.Converter = plan.details["converter"]
    direct = gguf_type in gguf_tools.CONVERTER_TYPES
    target = out_dir / gguf_name(stage)
    converted = target if direct else work_dir / f"{stage.name}.BF16.gguf"
    total = len(inspect_dir(source).tensors)  # the converter writes about one GGUF tensor per tensor
    steps = total + (0 if direct else 1)
    written = 0

    def on_tensor() -> None:
        nonlocal written
        written += 1
        report(ProgressEvent(stage.name, "progress", min(written, total), steps, unit="tensors"))

    report(ProgressEvent(stage.name, "progress", 0, steps, unit="tensors"))
    outtype = gguf_tools.CONVERTER_TYPES.get(gguf_type, "bf16")
    gguf_tools.convert(converter, source, converted, outtype, name=stage.name, on_tensor=on_tensor, should_cancel=should_cancel)
    if should_cancel():
        raise Cancelled(f"cancelled in stage {stage.name}")
    if not direct:
        gguf_tools.quantize(converted, target, gguf_type, threads=os.cpu_count() or 1)
        converted.unlink()
    report(ProgressEvent(stage.name, "progress", steps, steps, unit="tensors"))


def _run_torchao(stage: QuantizeStage, source: Path, out_dir: Path, report: Reporter) -> None:
    import torch
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig
    from transformers import AutoModelForCausalLM, TorchAoConfig

    gpu = stage.quantize.type == "int4"
    if gpu and not torch.cuda.is_available():
        raise MergerError(f"stage {stage.name!r}: torchao int4 runs on a CUDA GPU only; submit the job to a GPU worker (--gpu)")
    config = Int4WeightOnlyConfig() if gpu else Int8WeightOnlyConfig()
    report(ProgressEvent(stage.name, "progress", 0, 2, unit="steps"))
    model = AutoModelForCausalLM.from_pretrained(source, dtype="auto", device_map="cuda" if gpu else "cpu",
                                                 quantization_config=TorchAoConfig(config))
    report(ProgressEvent(stage.name, "progress", 1, 2, unit="steps"))
    model.save_pretrained(out_dir)
    for path in source.iterdir():  # tokenizer, chat template: whatever transformers did not write
        if path.is_file() and path.suffix != ".safetensors" and path.name not in WRITTEN_BY_TRANSFORMERS:
            shutil.copy2(path, out_dir / path.name)
    report(ProgressEvent(stage.name, "progress", 2, 2, unit="steps"))

"""The ``extract_lora`` stage: a LoRA adapter from a full fine-tune and its base, by mergekit-extract-lora
(a truncated SVD of each weight's difference), run in-process with progress and cancellation."""

import json
from pathlib import Path

from mergekit.scripts import extract_lora as mergekit_extract

from merger.errors import Problem, format_loc
from merger.modelfiles import ModelInfo
from merger.planning import InputRef, PlanContext, StageOutput, StagePlan, inspect_source, resolve_input
from merger.progress import CancelCheck, Reporter
from merger.recipe import ExtractLoraStage
from merger.stages.mergekit_hooks import observed

RELATION = "adapter"
UNDECOMPOSABLE = "embed_tokens|lm_head"


def summary(stage: ExtractLoraStage) -> str:
    spec = stage.extract_lora
    return f"A rank-{spec.rank} LoRA adapter extracted by merger (mergekit-extract-lora) from `{spec.model}` against `{spec.base}`."


def plan(stage: ExtractLoraStage, loc: tuple, context: PlanContext) -> tuple[StagePlan | None, list[Problem]]:
    spec = stage.extract_lora
    problems: list[Problem] = []
    inputs, infos = [], []
    for field, role in (("base", "base"), ("model", "donor")):
        where = format_loc(loc + (field,))
        text = getattr(spec, field)
        source = resolve_input(text, where, context, problems)
        if source is None:
            continue
        info = inspect_source(source, context, where, problems)
        if info is not None and info.is_adapter:
            problems.append(Problem(where, f"{text!r} is an adapter; extract_lora takes two full models"))
        inputs.append(InputRef(where, text, source, role, RELATION))
        infos.append(info)
    if len(infos) == 2 and all(infos):
        base, model = infos
        if base.architecture != model.architecture:
            problems.append(Problem(inputs[1].loc, f"architecture {model.architecture} differs from the base's {base.architecture}"))
        elif {n: s for n, (_d, s) in base.tensors.items()} != {n: s for n, (_d, s) in model.tensors.items()}:
            problems.append(Problem(inputs[1].loc, "tensor names or shapes differ from the base's"))
    label = inputs[0].source.label if inputs else spec.base
    output = ModelInfo(path=Path(), architecture=infos[0].architecture if infos and infos[0] else None, is_adapter=True,
                       adapter_config={"peft_type": "LORA", "r": spec.rank, "base_model_name_or_path": label})
    return StagePlan(stage, inputs, output, {"base_label": label}), problems


def run(plan: StagePlan, dirs: list[Path], out_dir: Path, work_dir: Path, report: Reporter, should_cancel: CancelCheck) -> StageOutput:
    spec: ExtractLoraStage = plan.stage.extract_lora
    args = ["--base-model", str(dirs[0]), "--model", str(dirs[1]), "--out-path", str(out_dir), "--max-rank", str(spec.rank),
            "--quiet", "--no-write-model-card"]
    if not spec.include_embeddings:
        args += ["--exclude-regex", UNDECOMPOSABLE, "--skip-undecomposable"]
    with observed(mergekit_extract, plan.stage.name, report, should_cancel, unit="modules"):
        mergekit_extract.main.main(args=args, standalone_mode=False)
    config_path = out_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = plan.details["base_label"]  # mergekit writes the local path it read
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out_dir / "README.md").unlink(missing_ok=True)  # merger writes the card
    return StageOutput(None, kind="adapter", card_relation="adapter", library="peft")

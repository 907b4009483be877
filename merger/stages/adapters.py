"""The ``adapters`` stage: LoRA adapters folded into a base model, or combined into one adapter.

fold: merger's own tensor math (merger.lora), one base shard in memory at a time, float32 updates
cast once. combine: PEFT's ``add_weighted_adapter`` (the reference implementation of every
combination type) on the base loaded once. Everything an adapter gets wrong is reported by name before
any work: another base, missing target modules, wrong shapes, unequal ranks where the combination
needs equal ones, non-LoRA or unsupported adapter features.
"""

import json
import shutil
from pathlib import Path

from merger import lora
from merger.errors import Cancelled, Problem, format_loc
from merger.modelfiles import ModelInfo, safetensors_header
from merger.planning import InputRef, PlanContext, StageOutput, StagePlan, inspect_source, resolve_input
from merger.progress import CancelCheck, ProgressEvent, Reporter
from merger.recipe import EQUAL_RANK_COMBINATIONS, AdaptersStage, Combination

RELATION = "adapter"
MAX_LISTED = 3


def summary(stage: AdaptersStage) -> str:
    spec = stage.adapters
    listed = ", ".join(f"`{a.path}` × {a.weight}" for a in spec.adapters)
    if spec.mode == "fold":
        return f"LoRA adapters folded into `{spec.base}` by merger: {listed}."
    combination = spec.combination.type if spec.combination else "cat"
    return f"One LoRA adapter for `{spec.base}`, combined by merger with PEFT ({combination}) from: {listed}."


def plan(stage: AdaptersStage, loc: tuple, context: PlanContext) -> tuple[StagePlan | None, list[Problem]]:
    spec = stage.adapters
    problems: list[Problem] = []
    base_loc = format_loc(loc + ("base",))
    base = resolve_input(spec.base, base_loc, context, problems)
    if base is None:
        return None, problems
    base_info = inspect_source(base, context, base_loc, problems)
    if base_info is not None and base_info.is_adapter:
        problems.append(Problem(base_loc, f"{spec.base!r} is an adapter, not a model"))
    inputs = [InputRef(base_loc, spec.base, base, "base", RELATION)]
    label = base.label
    configs = []
    for j, item in enumerate(spec.adapters):
        where = format_loc(loc + ("adapters", j, "path"))
        source = resolve_input(item.path, where, context, problems)
        if source is None:
            continue
        info = inspect_source(source, context, where, problems, adapter=True)
        if info is None:
            if source.kind != "stage":
                continue  # its problem is reported
            info = ModelInfo(path=Path(), is_adapter=True, adapter_config={})  # an earlier stage that failed to plan
        if not info.is_adapter:
            problems.append(Problem(where, f"{item.path!r} is a model, not a LoRA adapter"))
            continue
        problems += [Problem(where, f"{item.path}: {msg}") for msg in _adapter_problems(info, base_info, label, spec)]
        inputs.append(InputRef(where, item.path, source, "adapter", RELATION, weight=item.weight))
        configs.append((where, info.adapter_config))
    problems += _rank_problems(spec, configs)
    output = base_info if spec.mode == "fold" else _combined_info(spec, configs, base_info)
    return StagePlan(stage, inputs, output, {"base_label": label}), problems


def _adapter_problems(info: ModelInfo, base_info: ModelInfo | None, label: str, spec) -> list[str]:
    config = info.adapter_config or {}
    problems = lora.unsupported(config)
    if problems:
        return problems
    made_for = config.get("base_model_name_or_path")
    if made_for and not spec.allow_other_base and made_for.rstrip("/").split("/")[-1] != label.rstrip("/").split("/")[-1]:
        problems.append(f"was made for {made_for!r}, but the base is {label!r} (set allow_other_base: true if intended)")
    if base_info is None or not info.tensors:
        return problems
    found, leftovers = lora.modules(config, {k: shape for k, (_dtype, shape) in info.tensors.items()})
    if leftovers:
        problems.append(f"holds tensors merger can't fold as LoRA: {', '.join(leftovers[:MAX_LISTED])}")
    missing = [m.module for m in found if m.module + ".weight" not in base_info.tensors]
    if missing:
        problems.append(f"targets modules the base lacks: {', '.join(missing[:MAX_LISTED])}" + (f" (+{len(missing) - MAX_LISTED} more)" if len(missing) > MAX_LISTED else ""))
    fan = bool(config.get("fan_in_fan_out"))
    for m in found:
        weight = base_info.tensors.get(m.module + ".weight")
        if weight is None:
            continue
        out_features, in_features = weight[1] if not fan else weight[1][::-1]
        a_shape, b_shape = info.tensors[m.a_key][1], info.tensors[m.b_key][1]
        if a_shape[1] != in_features or b_shape[0] != out_features or a_shape[0] != b_shape[1]:
            problems.append(f"{m.module}: LoRA shapes A {list(a_shape)}, B {list(b_shape)} don't fit the base weight {list(weight[1])}")
            break
    return problems


def _rank_problems(spec, configs: list[tuple[str, dict]]) -> list[Problem]:
    if spec.mode != "combine" or not spec.combination or spec.combination.type not in EQUAL_RANK_COMBINATIONS:
        return []
    ranks = {where: config.get("r") for where, config in configs}
    if len(set(ranks.values())) <= 1:
        return []
    first = next(iter(ranks.values()))
    return [Problem(where, f"rank {r} differs from the first adapter's {first}; {spec.combination.type} needs equal ranks (cat or svd don't)")
            for where, r in ranks.items() if r != first]


def _combined_info(spec, configs: list[tuple[str, dict]], base_info: ModelInfo | None) -> ModelInfo | None:
    """What a later stage may check of the combined adapter before it exists: its config, not its tensors."""
    if not configs:
        return None
    first = configs[0][1]
    targets = sorted({t for _, c in configs for t in (c.get("target_modules") or [])})
    config = {**first, "target_modules": targets, "rank_pattern": {}, "alpha_pattern": {}}
    return ModelInfo(path=Path(), architecture=base_info.architecture if base_info else None, is_adapter=True, adapter_config=config)


def run(plan: StagePlan, dirs: list[Path], out_dir: Path, work_dir: Path, report: Reporter, should_cancel: CancelCheck) -> StageOutput:
    stage: AdaptersStage = plan.stage
    base_dir, adapter_dirs = dirs[0], dirs[1:]
    weights = [inp.weight for inp in plan.inputs[1:]]
    architecture = plan.output_info.architecture if plan.output_info else None
    if stage.adapters.mode == "fold":
        _fold(stage, base_dir, list(zip(adapter_dirs, weights, strict=True)), out_dir, report, should_cancel)
        return StageOutput(architecture, kind="model", card_relation="finetune")
    _combine(stage, base_dir, list(zip(adapter_dirs, weights, strict=True)), out_dir, plan.details["base_label"], report)
    return StageOutput(architecture, kind="adapter", card_relation="adapter", library="peft")


def _fold(stage, base_dir: Path, adapters: list[tuple[Path, float]], out_dir: Path, report: Reporter, should_cancel: CancelCheck) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    loaded = [(lora.LoadedAdapter.load(path, _config(path)), weight) for path, weight in adapters]
    dtype = getattr(torch, stage.adapters.dtype) if stage.adapters.dtype else None
    shards = sorted(base_dir.glob("*.safetensors"))
    total = sum(len(safetensors_header(shard)) for shard in shards)
    done = 0
    report(ProgressEvent(stage.name, "progress", 0, total))
    for shard in shards:  # one shard in memory at a time, never a copy of the base per adapter
        tensors = load_file(shard)
        for name in list(tensors):
            tensors[name] = lora.fold(tensors[name], name, loaded, dtype or tensors[name].dtype)
            done += 1
            report(ProgressEvent(stage.name, "progress", done, total))
            if should_cancel():
                raise Cancelled(f"stage {stage.name} cancelled")
        save_file(tensors, out_dir / shard.name, metadata={"format": "pt"})
        del tensors
    for path in base_dir.iterdir():  # config, tokenizer, index: everything but the weights and the card
        if path.is_file() and path.suffix != ".safetensors" and path.name != "README.md":
            shutil.copy2(path, out_dir / path.name)
    if dtype is not None:
        _set_config_dtype(out_dir / "config.json", stage.adapters.dtype)


def _set_config_dtype(config_path: Path, dtype: str) -> None:
    config = json.loads(config_path.read_text())
    config["dtype" if "dtype" in config else "torch_dtype"] = dtype
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _combine(stage, base_dir: Path, adapters: list[tuple[Path, float]], out_dir: Path, label: str, report: Reporter) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    spec = stage.adapters
    combination = spec.combination or Combination()
    names = [f"a{i}" for i in range(len(adapters))]
    report(ProgressEvent(stage.name, "progress", 0, len(adapters) + 1, unit="adapters"))
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, trust_remote_code=False)
    model = PeftModel.from_pretrained(model, str(adapters[0][0]), adapter_name=names[0])
    for i, (path, _weight) in enumerate(adapters[1:], start=1):
        model.load_adapter(str(path), adapter_name=names[i])
        report(ProgressEvent(stage.name, "progress", i, len(adapters) + 1, unit="adapters"))
    torch.manual_seed(stage.seed)  # dare_* drop at random
    options = {"density": combination.density, "majority_sign_method": combination.majority_sign_method}
    if combination.svd_rank is not None:
        options["svd_rank"] = combination.svd_rank
    model.add_weighted_adapter(names, [w for _, w in adapters], "combined", combination_type=combination.type,
                               **{k: v for k, v in options.items() if v is not None})
    staging = out_dir.parent / "peft"
    model.save_pretrained(str(staging), selected_adapters=["combined"], save_embedding_layers=False)
    for path in (staging / "combined").iterdir():
        shutil.move(str(path), out_dir / path.name)
    config_path = out_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = label  # PEFT would write the local path it loaded the base from
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    report(ProgressEvent(stage.name, "progress", len(adapters) + 1, len(adapters) + 1, unit="adapters"))


def _config(adapter_dir: Path) -> dict:
    return json.loads((adapter_dir / "adapter_config.json").read_text())

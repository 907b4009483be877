"""The ``merge`` stage: any mergekit merge, run in-process by merger's engine or by mergekit, with progress and
cancellation.

merger resolves every model reference itself (confined to the model roots) and hands mergekit only
absolute directories it has checked, so mergekit never sees a user path, never downloads, and never
loads a pickle. Planning reads configs and headers only and imports neither torch nor mergekit.
"""

import importlib.util
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from merger.errors import Cancelled, Problem, format_loc
from merger.merge_config import ModelPath, ModelReference
from merger.mergekit_refs import map_references, walk_references
from merger.modelfiles import ModelInfo
from merger.planning import InputRef, PlanContext, StageOutput, StagePlan, inspect_source, resolve_input
from merger.progress import CancelCheck, ProgressEvent, Reporter
from merger.recipe import RANDOMIZED_METHODS, MergeStage
from merger.references import UnresolvedReference
from merger.settings import Settings

if TYPE_CHECKING:
    from merger.engine import MergePlan

RELATION = "merge"
MAX_SHAPE_PROBLEMS = 3


@dataclass
class _RefSlots:
    reference: ModelReference
    model_input: int
    adapter_input: int | None


def plan(stage: MergeStage, loc: tuple, context: PlanContext) -> tuple[StagePlan | None, list[Problem]]:
    try:
        config = stage.config
    except Exception:  # noqa: BLE001 - mergekit's validation errors were already reported by the schema
        return None, []
    problems: list[Problem] = []
    inputs: list[InputRef] = []
    infos: dict[int, ModelInfo | None] = {}
    slots: dict[ModelReference, _RefSlots] = {}
    weights = {m.model: m.parameters.get("weight") for m in config.models or [] if m.parameters}

    for ref_loc, ref in walk_references(config):
        where = format_loc(loc + ref_loc)
        role = "base" if ref_loc[-1] == "base_model" else "tokenizer" if ref_loc[0] == "tokenizer_source" else "donor"
        if ref in slots:
            if role == "base":
                inputs[slots[ref].model_input].role = "base"
            continue
        source = resolve_input(ref.model.path, where, context, problems, ref.model.revision)
        if source is None:
            continue
        weight = weights.get(ref)
        inputs.append(InputRef(where, str(ref.model), source, role, RELATION, weight if isinstance(weight, (int, float)) else None))
        slot = _RefSlots(ref, len(inputs) - 1, None)
        infos[slot.model_input] = inspect_source(source, context, where, problems)
        if ref.lora is not None:
            adapter = resolve_input(ref.lora.path, where, context, problems, ref.lora.revision)
            if adapter is not None:
                info = inspect_source(adapter, context, where, problems, adapter=True)
                if adapter.kind == "stage" and not (info and info.is_adapter):
                    problems.append(Problem(where, f"stage {ref.lora.path!r} does not produce a LoRA adapter (use an adapters stage in combine mode)"))
                inputs.append(InputRef(where, str(ref.lora), adapter, "adapter", "adapter", applied_to=where))
                slot.adapter_input = len(inputs) - 1
        slots[ref] = slot

    details = {"slots": list(slots.values())}
    template = _chat_template(config.chat_template, context, loc, problems)
    if template is not None:
        details["chat_template"] = template
    base_index = next((i for i, inp in enumerate(inputs) if inp.role == "base"), 0)
    base_info = infos.get(base_index)
    problems += _compatibility(config, loc, inputs, infos, base_info)
    output_info = base_info if config.models else None
    return StagePlan(stage, inputs, output_info, details), problems


def _compatibility(config, loc, inputs, infos, base_info: ModelInfo | None) -> list[Problem]:
    """Architectures agree; for a models-merge, every tensor has the base's shape; slices fit the layers."""
    problems = []
    if base_info is None:
        return problems
    for index, info in infos.items():
        if info is None or info is base_info or inputs[index].role == "tokenizer":
            continue
        where = inputs[index].loc
        if info.architecture != base_info.architecture:
            problems.append(Problem(where, f"architecture {info.architecture} differs from the base's {base_info.architecture}"))
            continue
        if config.models:
            mismatches = [
                f"{name} {list(shape)} vs base {list(base_info.tensors[name][1])}"
                for name, (_dtype, shape) in info.tensors.items()
                if name in base_info.tensors and base_info.tensors[name][1] != shape
            ]
            missing = sorted(set(base_info.tensors) - set(info.tensors))
            if mismatches:
                problems.append(Problem(where, "tensor shapes differ from the base: " + "; ".join(mismatches[:MAX_SHAPE_PROBLEMS])))
            if missing:
                problems.append(Problem(where, f"lacks {len(missing)} tensors of the base, e.g. {', '.join(missing[:MAX_SHAPE_PROBLEMS])}"))
    for s, out_slice in enumerate(config.slices or []):
        for j, src in enumerate(out_slice.sources):
            slot = next((i for i, inp in enumerate(inputs) if inp.text == str(src.model.model)), None)
            info = infos.get(slot) if slot is not None else None
            start, end = src.layer_range
            if info and info.num_layers is not None and not (0 <= start < end <= info.num_layers):
                where = format_loc(loc + ("slices", s, "sources", j, "layer_range"))
                problems.append(Problem(where, f"[{start}, {end}] is outside the model's {info.num_layers} layers"))
    return problems


def _chat_template(value: str | None, context: PlanContext, loc: tuple, problems: list[Problem]) -> str | None:
    """A built-in template name, ``auto``, or literal Jinja pass through; anything else is a file under the roots."""
    builtin = _builtin_chat_templates()
    if value is None or value == "auto" or value in builtin or "{" in value:
        return None
    try:
        return context.resolver.confine(value).read_text(encoding="utf-8")
    except (UnresolvedReference, OSError, UnicodeDecodeError) as exc:
        problems.append(Problem(format_loc(loc + ("chat_template",)), f"not a built-in template name ({', '.join(sorted(builtin))}), Jinja text, or a readable file under the model roots: {exc}"))
        return None


@cache
def _builtin_chat_templates() -> frozenset[str]:
    """The names of the templates mergekit ships (files in its package; nothing of mergekit is imported)."""
    spec = importlib.util.find_spec("mergekit")
    folder = Path(next(iter(spec.submodule_search_locations))) / "_data" / "chat_templates"
    return frozenset(p.name.removesuffix(".jinja") for p in folder.iterdir())


def summary(stage: MergeStage) -> str:
    return f"A `{stage.config.merge_method}` merge made by merger with mergekit."


def run(plan: StagePlan, dirs: list[Path], out_dir: Path, work_dir: Path, report: Reporter, should_cancel: CancelCheck) -> StageOutput:
    """Run the merge into ``out_dir``; ``dirs[i]`` is the directory of ``plan.inputs[i]``: merger's engine
    when it reproduces the config exactly, mergekit otherwise."""
    stage: MergeStage = plan.stage
    stated = {"search": stage.provenance.search, "stated_in_recipe": True} if stage.provenance else None
    output = StageOutput(plan.output_info.architecture if plan.output_info else None, card_relation="merge", origin=stated)
    if (native := _engine_plan(plan, dirs)) is not None:
        return replace(output, digests=_run_engine(native, stage, out_dir, report, should_cancel))

    import mergekit.merge
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from merger.stages.mergekit_hooks import observed

    def local(ref: ModelReference) -> ModelReference:
        slot = next(s for s in plan.details["slots"] if s.reference == ref)
        lora = ModelPath(path=str(dirs[slot.adapter_input])) if slot.adapter_input is not None else None
        return ModelReference(model=ModelPath(path=str(dirs[slot.model_input])), lora=lora, override_architecture=ref.override_architecture)

    config = MergeConfiguration.model_validate(map_references(stage.config, local).model_dump())
    if "chat_template" in plan.details:
        config = config.model_copy(update={"chat_template": plan.details["chat_template"]})
    options = MergeOptions(
        lora_merge_cache=str(work_dir / "lora"),
        lora_merge_dtype="float32",
        random_seed=stage.seed,
        trust_remote_code=False,
        write_model_card=False,
        quiet=True,
    )
    with observed(mergekit.merge, stage.name, report, should_cancel), _threads_for(config.merge_method):
        mergekit.merge.run_merge(config, str(out_dir), options=options)
    return output


def _engine_plan(plan: StagePlan, dirs: list[Path]) -> "MergePlan | None":
    """The one predicate: engine.prepare plans the merge or says why it cannot (then mergekit runs it)."""
    from merger import engine

    if "chat_template" in plan.details:
        return None
    local = {str(s.reference): dirs[s.model_input] for s in plan.details["slots"] if s.adapter_input is None}
    try:
        return engine.prepare(plan.stage.merge, local)
    except engine.Unsupported:
        return None


def _run_engine(native: "MergePlan", stage: MergeStage, out_dir: Path, report: Reporter, should_cancel: CancelCheck) -> dict[str, str]:
    def on_tensor(done: int, total: int) -> None:
        report(ProgressEvent(stage.name, "progress", done, total, "tensors"))
        if should_cancel():
            raise Cancelled(f"stage {stage.name} cancelled")

    from merger import engine

    report(ProgressEvent(stage.name, "progress", 0, len(native.tensors), "tensors"))
    return engine.execute(native, out_dir, seed=stage.seed, device=Settings().device, on_tensor=on_tensor)


@contextmanager
def _threads_for(method: str):
    """Randomized methods are reproducible for a seed only single-threaded."""
    import torch

    if method not in RANDOMIZED_METHODS:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)

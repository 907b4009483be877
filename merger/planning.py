"""Turning a parsed recipe into a plan: every reference resolved and every input checked before any work.

Checks read only configs and safetensors headers. All problems of all stages are reported together.
"""

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merger.errors import Problem, RecipeError
from merger.modelfiles import ModelDirError, ModelInfo, inspect_dir
from merger.recipe import Draft
from merger.references import Resolver, Source, UnresolvedReference


@dataclass
class InputRef:
    """One input of a stage, as written (``loc``, ``text``) and as resolved (``source``)."""

    loc: str
    text: str
    source: Source
    role: str  # base | donor | tokenizer | adapter | evaluated
    relation: str  # the lineage relation of the output to this input: merge | adapter ...
    weight: float | None = None
    applied_to: str | None = None  # for an adapter folded into a model: that model's loc


@dataclass
class StagePlan:
    stage: Any
    inputs: list[InputRef]
    output_info: ModelInfo | None  # the output's predicted tensors, for checks of later stages
    details: dict = field(default_factory=dict)  # kind-specific data the runner needs


@dataclass(frozen=True)
class StageOutput:
    """What a runner tells the orchestrator about the directory it wrote."""

    architecture: str | None
    kind: str = "model"  # model | adapter
    card_relation: str = "merge"  # the Hub model-tree relation written in the card
    library: str = "transformers"
    made_by: Any = None  # the stage recipe that rebuilds these files when it is not the planned stage (a search's merge)
    origin: dict | None = None  # recorded with the model (a search's record)
    digests: dict[str, str] = field(default_factory=dict)  # sha256 of files the runner hashed as it wrote them, by path


@dataclass
class PlanContext:
    resolver: Resolver
    outputs: dict[str, ModelInfo | None] = field(default_factory=dict)  # earlier stage -> predicted output

    @property
    def stage_names(self) -> frozenset[str]:
        return frozenset(self.outputs)


def resolve_input(text: str, where: str, context: PlanContext, problems: list[Problem], revision: str | None = None) -> Source | None:
    """Resolve a reference a stage names; one that does not resolve is a problem at ``where`` (and None)."""
    try:
        return context.resolver.resolve(text, revision, stages=context.stage_names)
    except UnresolvedReference as exc:
        problems.append(Problem(where, str(exc)))
        return None


def inspect_source(source: Source, context: PlanContext, where: str, problems: list[Problem], *, adapter: bool = False,
                   gguf_ok: bool = False) -> ModelInfo | None:
    """What validation needs to know of an input: an earlier stage's predicted output, or its directory.

    A GGUF model is a problem unless ``gguf_ok``: only evaluation reads GGUF; the other stages need safetensors.
    """
    if source.kind == "stage":
        info = context.outputs.get(source.stage)
    else:
        try:
            info = inspect_dir(source.path, adapter=adapter)
        except ModelDirError as exc:
            problems.append(Problem(where, str(exc)))
            return None
    if info is not None and info.gguf_file is not None and not gguf_ok:
        problems.append(Problem(where, "a GGUF model (a quantized export); this stage needs safetensors weights, use its source"))
        return None
    return info


def is_adapter_dir(source: Source) -> bool:
    """A directory input that holds a PEFT adapter (``inspect_source`` would read it as a model and miss config.json)."""
    return source.kind != "stage" and (Path(source.path) / "adapter_config.json").is_file()


def plan_draft(draft: Draft, resolver: Resolver) -> list[StagePlan]:
    """Plan every valid stage of a draft; raise ``RecipeError`` with the draft's and the plan's problems."""
    from merger.stages import STAGE_RUNNERS

    context = PlanContext(resolver)
    plans, problems = [], list(draft.problems)
    valid = dict(draft.stages)
    for i, name in enumerate(draft.names):
        stage = valid.get(i)
        plan = None
        if stage is not None:
            plan, stage_problems = STAGE_RUNNERS[stage.kind].plan(stage, ("stages", i, stage.kind), context)
            problems += stage_problems
        if name and (stage is None or stage.produces_model):  # an evaluate stage's name is no model
            context.outputs[name] = plan.output_info if plan else None
        if plan:
            plans.append(plan)
    if problems:
        raise RecipeError(sorted(problems, key=_stage_index))
    return plans


def _stage_index(problem: Problem) -> int:
    match = re.match(r"stages\[(\d+)\]", problem.loc)
    return int(match.group(1)) if match else -1

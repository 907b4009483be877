"""Turning a parsed recipe into a plan: every reference resolved and every input checked before any work.

Checks read only configs and safetensors headers. All problems of all stages are reported together.
"""

from dataclasses import dataclass, field
from typing import Any

from merger.errors import Problem, RecipeError
from merger.modelfiles import ModelInfo
from merger.recipe import Recipe
from merger.references import Resolver, Source


@dataclass
class InputRef:
    """One input of a stage, as written (``loc``, ``text``) and as resolved (``source``)."""

    loc: str
    text: str
    source: Source
    role: str  # base | donor | tokenizer | adapter
    relation: str  # the lineage relation of the output to this input: merge | adapter ...
    weight: float | None = None
    applied_to: str | None = None  # for an adapter folded into a model: that model's loc


@dataclass
class StagePlan:
    stage: Any
    inputs: list[InputRef]
    output_info: ModelInfo | None  # the output's predicted tensors, for checks of later stages
    details: dict = field(default_factory=dict)  # kind-specific data the runner needs


@dataclass
class PlanContext:
    resolver: Resolver
    outputs: dict[str, ModelInfo | None] = field(default_factory=dict)  # earlier stage -> predicted output

    @property
    def stage_names(self) -> frozenset[str]:
        return frozenset(self.outputs)


def plan_recipe(recipe: Recipe, resolver: Resolver) -> list[StagePlan]:
    from merger.stages import STAGE_RUNNERS

    context = PlanContext(resolver)
    plans, problems = [], []
    for i, stage in enumerate(recipe.stages):
        plan, stage_problems = STAGE_RUNNERS[stage.kind].plan(stage, ("stages", i, stage.kind), context)
        problems += stage_problems
        context.outputs[stage.name] = plan.output_info if plan else None
        if plan:
            plans.append(plan)
    if problems:
        raise RecipeError(problems)
    return plans

"""The ``evaluate`` stage: models of the recipe or the store, with their parents, measured on the same data.

It produces no model: the orchestrator calls ``evaluate`` instead of ``run``, and the results are rows in
lineage (``merger.evaluation``). Data files are read from under the model roots, like every other input;
every data problem (missing file, bad JSONL line, a task YAML merger refuses) is reported by ``plan``.
"""

from pathlib import Path
from typing import TYPE_CHECKING

from merger.db import ModelRow
from merger.errors import Problem, format_loc
from merger.evaluation import harness
from merger.evaluation.datasets import DataError, DataFile, task_file, text_file
from merger.planning import InputRef, PlanContext, StagePlan, inspect_source, is_adapter_dir, resolve_input
from merger.progress import CancelCheck, Reporter
from merger.recipe import EvaluateSpec, EvaluateStage
from merger.references import Resolver, UnresolvedReference
from merger.settings import Settings
from merger.store import Store

if TYPE_CHECKING:  # the evaluation code (torch) is imported when a stage is measured, not when it is checked
    from merger.evaluation.suite import Options, Report

READERS = {"tasks": task_file, "perplexity": text_file}


def plan(stage: EvaluateStage, loc: tuple, context: PlanContext) -> tuple[StagePlan | None, list[Problem]]:
    spec = stage.evaluate
    problems: list[Problem] = []
    inputs = []
    for j, text in enumerate(spec.models):
        where = format_loc(loc + ("models", j))
        source = resolve_input(text, where, context, problems)
        if source is None:
            continue
        problem = _model_problem(source, text, context, where)
        if problem:
            problems.append(problem)
        inputs.append(InputRef(where, text, source, "evaluated", "evaluation"))
    data: list[DataFile] = []
    for field in ("tasks", "perplexity", "lm_eval"):
        for j, text in enumerate(getattr(spec, field)):
            try:
                data.append(_data_file(field, text, context.resolver))
            except (DataError, UnresolvedReference) as exc:
                problems.append(Problem(format_loc(loc + (field, j)), str(exc)))
    return StagePlan(stage, inputs, None, {"data": data}), problems


def _model_problem(source, text: str, context: PlanContext, where: str) -> Problem | None:
    """A model to evaluate: safetensors or GGUF, never an adapter."""
    problems: list[Problem] = []
    adapter = is_adapter_dir(source)
    info = None if adapter else inspect_source(source, context, where, problems, gguf_ok=True)
    if adapter or (info is not None and info.is_adapter):
        return Problem(where, f"{text!r} is a LoRA adapter, not a standalone model; evaluate a model it is folded into")
    return problems[0] if problems else None


def _data_file(field: str, text: str, resolver: Resolver) -> DataFile:
    path = resolver.data_file(text)
    if field == "lm_eval":
        return harness.task_file(path, text, lambda data, yaml_dir: _confined(resolver, data, yaml_dir))
    return READERS[field](path, text)


def _confined(resolver: Resolver, text: str, yaml_dir: Path) -> Path:
    try:
        return resolver.data_file(text, relative_to=yaml_dir)
    except UnresolvedReference as exc:
        raise DataError(str(exc)) from None


def options_of(spec: EvaluateSpec) -> "Options":
    from merger import devices
    from merger.evaluation.suite import Options

    return Options(limit=spec.limit, parents=spec.parents, dtype=spec.dtype, runtime=spec.runtime, window=spec.window,
                   batch_size=spec.batch_size, device=devices.resolve(Settings().device))


def evaluate(plan: StagePlan, models: list[ModelRow], store: Store, *, force: bool, report: Reporter,
             should_cancel: CancelCheck) -> "Report":
    """``models[i]`` is the model of ``plan.inputs[i]``."""
    from merger.evaluation.suite import evaluate as evaluate_models

    return evaluate_models(store, models, plan.details["data"], options_of(plan.stage.evaluate), stage=plan.stage.name, force=force,
                           report=report, should_cancel=should_cancel)

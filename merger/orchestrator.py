"""The one orchestrator: the CLI, the API and the worker all run recipes through ``run_recipe``.

For each stage, in order: resolve its inputs to content ids, look up the cache (same stage recipe, same
input ids, same software versions), else run the stage's runner into a staging directory, write the
model card, and publish the result atomically into the store with its lineage. A stage that makes no
model (``evaluate``) stores its results in lineage instead, each cached on its own.
"""

import time
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from merger import __version__
from merger.card import render_card
from merger.db import ModelRow
from merger.errors import Cancelled, MergerError, StageFailed
from merger.evaluation.suite import Report
from merger.hashing import digest_json
from merger.planning import InputRef, StagePlan, plan_draft
from merger.progress import CancelCheck, ProgressEvent, Reporter, never_cancel, no_report
from merger.recipe import Draft, Recipe, draft_recipe
from merger.references import Resolver
from merger.safe_yaml import load_recipe_file
from merger.settings import Settings
from merger.stages import STAGE_RUNNERS
from merger.store import Parent, Store


@dataclass(frozen=True)
class StageResult:
    stage: str
    model: ModelRow | None  # None for a stage that makes no model
    cache_hit: bool  # for an evaluate stage: every result was cached
    seconds: float
    evaluation: Report | None = None  # an evaluate stage's results


def final_model(results: list[StageResult]) -> ModelRow | None:
    """The last model a run produced (or found cached)."""
    return next((r.model for r in reversed(results) if r.model is not None), None)


def software_versions() -> dict[str, str]:
    versions = {name: version(name) for name in ("mergekit", "transformers", "torch", "peft", "safetensors")}
    return {"merger": __version__, **versions}


def _stage_versions(plan: StagePlan, versions: dict[str, str]) -> dict[str, str]:
    """The common versions plus the packages only this stage kind runs (``SOFTWARE`` of its runner)."""
    return versions | {name: _installed_version(name) for name in getattr(STAGE_RUNNERS[plan.stage.kind], "SOFTWARE", ())}


def _installed_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def check_recipe(data: Any, settings: Settings, store: Store, *, default_name: str) -> Recipe:
    """Parse raw recipe data and check every input of every stage; ``RecipeError`` lists all problems."""
    draft = draft_recipe(data, default_name=default_name)
    plan_draft(draft, Resolver(settings, store))
    return draft.recipe()


def load_and_check(path: Path, settings: Settings, store: Store) -> Recipe:
    data = load_recipe_file(path, max_bytes=settings.max_recipe_bytes)
    return check_recipe(data, settings, store, default_name=path.stem)


def run_recipe(
    recipe: Recipe,
    settings: Settings,
    store: Store,
    *,
    force: bool = False,
    report: Reporter = no_report,
    should_cancel: CancelCheck = never_cancel,
) -> list[StageResult]:
    versions = software_versions()
    outputs: dict[str, ModelRow] = {}
    results = []
    for plan in _plans(recipe, settings, store):
        if should_cancel():
            raise Cancelled(f"cancelled before stage {plan.stage.name}")
        if plan.stage.produces_model:
            result = _run_stage(plan, outputs, settings, store, versions, force, report, should_cancel)
            outputs[plan.stage.name] = result.model
        else:
            result = _run_evaluation(plan, outputs, store, force, report, should_cancel)
        results.append(result)
    return results


def cached_results(recipe: Recipe, settings: Settings, store: Store) -> list[ModelRow] | None:
    """Every stage's output if all of them are cached, else None; runs nothing.

    A recipe that evaluates is never answered from here: it runs (its cached results make that quick).
    """
    if not all(stage.produces_model for stage in recipe.stages):
        return None
    versions = software_versions()
    outputs: dict[str, ModelRow] = {}
    for plan in _plans(recipe, settings, store):
        inputs = [_input_model(inp, outputs, store) for inp in plan.inputs]
        model = store.cached(_cache_key(plan, inputs, _stage_versions(plan, versions)))
        if model is None:
            return None
        outputs[plan.stage.name] = model
    return list(outputs.values())


def _plans(recipe: Recipe, settings: Settings, store: Store) -> list[StagePlan]:
    return plan_draft(Draft(stages=list(enumerate(recipe.stages)), names=recipe.stage_names()), Resolver(settings, store))


def _cache_key(plan: StagePlan, inputs: list[ModelRow], versions: dict) -> str:
    """Same stage recipe, same input content, same software: same output."""
    stage = plan.stage.model_dump(mode="json")
    return digest_json({"stage": stage, "inputs": [[i.loc, i.role, m.id] for i, m in zip(plan.inputs, inputs, strict=True)], "versions": versions})


def _run_stage(plan: StagePlan, outputs: dict[str, ModelRow], settings: Settings, store: Store,
               versions: dict, force: bool, report: Reporter, should_cancel: CancelCheck) -> StageResult:
    stage = plan.stage
    versions = _stage_versions(plan, versions)
    started = time.monotonic()
    report(ProgressEvent(stage.name, "start"))
    inputs = [_input_model(inp, outputs, store) for inp in plan.inputs]
    normalized = stage.model_dump(mode="json")
    key = _cache_key(plan, inputs, versions)

    cached = None if force else store.cached(key)
    if cached is not None:
        seconds = time.monotonic() - started
        store.record_run(stage=stage.name, cache_key=key, model_id=cached.id, cache_hit=True, seconds=seconds)
        report(ProgressEvent(stage.name, "done", model_id=cached.id, cache_hit=True))
        return StageResult(stage.name, cached, True, seconds)

    runner = STAGE_RUNNERS[stage.kind]
    with store.staging() as work:
        out_dir = work / "out"
        out_dir.mkdir()
        dirs = [store.path_of(m) for m in inputs]
        with _engine_errors(stage):
            output = runner.run(plan, dirs, out_dir, work, report, should_cancel)
        parents = [(inp.role, model, inp.weight) for inp, model in zip(plan.inputs, inputs, strict=True)]
        (out_dir / "README.md").write_text(
            render_card(
                name=stage.name, relation=output.card_relation, summary=runner.summary(stage), parents=parents,
                recipe=normalized, versions=versions, library=output.library,
            ),
            encoding="utf-8",
        )
        model = store.publish(
            out_dir,
            name=stage.name,
            kind=output.kind,
            architecture=output.architecture,
            parents=[
                Parent(m.id, inp.relation, inp.role, inp.weight, {"loc": inp.loc, "ref": inp.text, **({"applied_to": inp.applied_to} if inp.applied_to else {})})
                for inp, m in zip(plan.inputs, inputs, strict=True)
            ],
            recipe=normalized,
            recipe_digest=digest_json(normalized),
            versions=versions,
        )
    store.remember(key, model.id)
    seconds = time.monotonic() - started
    store.record_run(stage=stage.name, cache_key=key, model_id=model.id, cache_hit=False, seconds=seconds)
    report(ProgressEvent(stage.name, "done", model_id=model.id))
    return StageResult(stage.name, model, False, seconds)


def _run_evaluation(plan: StagePlan, outputs: dict[str, ModelRow], store: Store, force: bool, report: Reporter,
                    should_cancel: CancelCheck) -> StageResult:
    stage = plan.stage
    started = time.monotonic()
    report(ProgressEvent(stage.name, "start", unit="examples"))
    models = [_input_model(inp, outputs, store) for inp in plan.inputs]
    with _engine_errors(stage):
        evaluation = STAGE_RUNNERS[stage.kind].evaluate(plan, models, store, force=force, report=report,
                                                        should_cancel=should_cancel)
    cache_hit = all(r.cache_hit for r in evaluation.results)
    report(ProgressEvent(stage.name, "done", cache_hit=cache_hit))
    return StageResult(stage.name, None, cache_hit, time.monotonic() - started, evaluation)


@contextmanager
def _engine_errors(stage):
    """The engines' own errors name the stage, with the cause chained; merger's errors pass as they are."""
    try:
        yield
    except MergerError:
        raise
    except Exception as exc:
        raise StageFailed(f"stage {stage.name!r} failed in {stage.kind}: {type(exc).__name__}: {exc}") from exc


def _input_model(inp: InputRef, outputs: dict[str, ModelRow], store: Store) -> ModelRow:
    """The stored (or registered external) model behind an input, so lineage names it by content id."""
    source = inp.source
    if source.kind == "stage":
        return outputs[source.stage]
    if source.kind == "store":
        return store.get(source.model_id)
    kind = "adapter" if inp.role == "adapter" else "model"
    return store.register_directory(Path(source.path), name=source.hub_id or Path(source.path).name, kind=kind)


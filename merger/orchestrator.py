"""The one orchestrator: the CLI, the API and the worker all run recipes through ``run_recipe``.

For each stage, in order: resolve its inputs to content ids, look up the cache (same stage recipe, same
input ids, same software versions), else run the stage's runner into a staging directory, write the
model card, and publish the result atomically into the store with its lineage. A stage that makes no
model (``evaluate``) stores its results in lineage instead, each cached on its own.
"""

import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from merger import __version__
from merger.card import CardInput, model_label, render_card
from merger.db import ModelRow
from merger.errors import Cancelled, MergerError, StageFailed
from merger.hashing import FileEntry, digest_json, manifest, manifest_id
from merger.planning import InputRef, StageOutput, StagePlan, plan_draft
from merger.progress import CancelCheck, ProgressEvent, Reporter, never_cancel, no_report
from merger.recipe import Draft, Recipe, draft_recipe
from merger.references import Pin, Resolver
from merger.safe_yaml import load_recipe_file
from merger.settings import Settings
from merger.stages import STAGE_RUNNERS
from merger.store import PLACEHOLDER, Parent, Store

if TYPE_CHECKING:  # the evaluation code (torch) is imported by the evaluate stage that runs it
    from merger.evaluation.suite import Report


@dataclass(frozen=True)
class StageResult:
    stage: str
    model: ModelRow | None  # None for a stage that makes no model
    cache_hit: bool  # for an evaluate stage: every result was cached
    seconds: float
    evaluation: "Report | None" = None  # an evaluate stage's results
    created: bool = False  # this run stored the model (not a cache hit, nor bytes that were stored already)


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


def check_recipe(data: Any, settings: Settings, store: Store, *, default_name: str, viewer: str | None = None,
                 as_of: datetime | None = None) -> Recipe:
    """Parse raw recipe data and check every input of every stage; ``RecipeError`` lists all problems.

    ``viewer``: the user the recipe runs for, whose models it may name (None: the whole store); ``as_of``: only
    models stored by then (a job's run names what its submission could).
    """
    draft = draft_recipe(data, default_name=default_name)
    plan_draft(draft, Resolver(settings, store, viewer=viewer, as_of=as_of))
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
    viewer: str | None = None,
    as_of: datetime | None = None,
) -> list[StageResult]:
    versions = software_versions()
    outputs: dict[str, ModelRow] = {}
    results = []
    for plan in _plans(recipe, settings, store, viewer, as_of):
        if should_cancel():
            raise Cancelled(f"cancelled before stage {plan.stage.name}")
        if plan.stage.produces_model:
            result = _run_stage(plan, outputs, settings, store, versions, force, report, should_cancel)
            outputs[plan.stage.name] = result.model
        else:
            result = _run_evaluation(plan, outputs, store, force, report, should_cancel)
        results.append(result)
    return results


@dataclass(frozen=True)
class Rebuild:
    """The outcome of re-running the stage that produced a model on the inputs it recorded."""

    model: ModelRow
    rebuilt_id: str
    differences: list[str]  # one line per file that changed, is missing, or is new
    version_changes: dict[str, tuple[str | None, str | None]]  # software: (recorded, now)

    @property
    def identical(self) -> bool:
        return self.rebuilt_id == self.model.id


def rebuild(model: ModelRow, settings: Settings, store: Store, *, report: Reporter = no_report,
            should_cancel: CancelCheck = never_cancel) -> Rebuild:
    """Re-run the stage recipe that produced ``model`` on the exact input ids its edges record, and compare.

    Every input reference is pinned to the content id it resolved to then, whatever names point to now. The
    stage runs in staging and nothing is published: the store is left as it was, whatever the outcome.
    """
    if not model.recipe:
        raise MergerError(f"{_named(model)} was not built by a merger stage (it was registered or imported): there is no recipe to re-run")
    draft = draft_recipe({"stages": [model.recipe]}, default_name=model.name or "rebuild")
    [plan] = plan_draft(draft, Resolver(settings, store, pins=_pins(model, store)))
    inputs = [store.get(inp.source.model_id) for inp in plan.inputs]
    recorded = [edge.parent_id for edge in model.parents]
    if [m.id for m in inputs] != recorded:
        raise MergerError(f"cannot rebuild {_named(model)}: its recipe now plans the inputs {_short(m.id for m in inputs)}, "
                          f"but the model recorded {_short(recorded)}")
    versions = _stage_versions(plan, software_versions())
    with store.staging() as work:
        out_dir, _ = _build(plan, inputs, versions, store, work, report, should_cancel)
        entries = manifest(out_dir)
    return Rebuild(model, manifest_id(entries), _file_differences(model.files, entries), _version_changes(model.versions or {}, versions))


def _pins(model: ModelRow, store: Store) -> dict[str, Pin]:
    """Each recorded input reference pinned to its content id; every input no longer available named at once."""
    pins, missing = {}, []
    for edge in model.parents:
        details = edge.details or {}
        parent = store.get(edge.parent_id)
        problem = _unavailable(parent, store)
        if problem:
            missing.append(f"{details.get('loc', f'input {edge.position}')}: {details.get('ref', parent.name)!r} ({parent.id[:12]}) {problem}")
        elif "ref" in details:
            pins[details["ref"]] = Pin(parent.id, details.get("label") or model_label(parent))
    if missing:
        raise MergerError(f"cannot rebuild {_named(model)}; inputs no longer available:\n  " + "\n  ".join(missing))
    return pins


def _unavailable(model: ModelRow, store: Store) -> str | None:
    """Why a recorded input can't be read with the bytes it had, or None."""
    if model.kind == PLACEHOLDER:
        return "is a placeholder with no files"
    path = store.path_of(model)
    if not path.is_dir():
        return f"is gone: {path} does not exist"
    if model.location is not None:  # an external directory: its content may have changed since
        now = manifest_id(manifest(path, store.hashes.sha256))
        return f"has changed: {path} now holds content {now[:12]}" if now != model.id else None
    lacking = [f.path for f in model.files if not (path / f.path).is_file()]
    return f"is incomplete: {path} lacks {', '.join(lacking[:3])}" if lacking else None


def _file_differences(recorded: list, rebuilt: list[FileEntry]) -> list[str]:
    before = {f.path: f.sha256 for f in recorded}
    after = {e.path: e.sha256 for e in rebuilt}
    lines = []
    for path in sorted(before.keys() | after.keys()):
        if path not in after:
            lines.append(f"{path}: missing from the rebuild")
        elif path not in before:
            lines.append(f"{path}: only in the rebuild")
        elif before[path] != after[path]:
            lines.append(f"{path}: sha256 {before[path][:12]} recorded, {after[path][:12]} rebuilt")
    return lines


def _version_changes(recorded: dict, now: dict) -> dict[str, tuple[str | None, str | None]]:
    return {name: (recorded.get(name), now.get(name)) for name in sorted(recorded.keys() | now.keys()) if recorded.get(name) != now.get(name)}


def _named(model: ModelRow) -> str:
    return f"{model.name} ({model.id[:12]})" if model.name else model.id


def _short(ids) -> str:
    return ", ".join(i[:12] for i in ids) or "none"


def cached_results(recipe: Recipe, settings: Settings, store: Store, viewer: str | None = None) -> list[ModelRow] | None:
    """Every stage's output if all of them are cached, else None; runs nothing.

    A recipe that evaluates is never answered from here: it runs (its cached results make that quick).
    """
    if not all(stage.produces_model for stage in recipe.stages):
        return None
    versions = software_versions()
    outputs: dict[str, ModelRow] = {}
    for plan in _plans(recipe, settings, store, viewer):
        inputs = [_input_model(inp, outputs, store) for inp in plan.inputs]
        model = store.cached(_cache_key(plan, inputs, _stage_versions(plan, versions)))
        if model is None:
            return None
        outputs[plan.stage.name] = model
    return list(outputs.values())


def _plans(recipe: Recipe, settings: Settings, store: Store, viewer: str | None, as_of: datetime | None = None) -> list[StagePlan]:
    resolver = Resolver(settings, store, viewer=viewer, as_of=as_of)
    return plan_draft(Draft(stages=list(enumerate(recipe.stages)), names=recipe.stage_names()), resolver)


def _cache_key(plan: StagePlan, inputs: list[ModelRow], versions: dict) -> str:
    """Same stage recipe, same input content, same software: same output."""
    stage = plan.stage.lineage_form()
    return digest_json({"stage": stage, "inputs": [[i.loc, i.role, m.id] for i, m in zip(plan.inputs, inputs, strict=True)], "versions": versions})


def _run_stage(plan: StagePlan, outputs: dict[str, ModelRow], settings: Settings, store: Store,
               versions: dict, force: bool, report: Reporter, should_cancel: CancelCheck) -> StageResult:
    stage = plan.stage
    versions = _stage_versions(plan, versions)
    started = time.monotonic()
    report(ProgressEvent(stage.name, "start"))
    inputs = [_input_model(inp, outputs, store) for inp in plan.inputs]
    key = _cache_key(plan, inputs, versions)

    cached = None if force else store.cached(key)
    if cached is not None:
        seconds = time.monotonic() - started
        store.record_run(stage=stage.name, cache_key=key, model_id=cached.id, cache_hit=True, seconds=seconds)
        report(ProgressEvent(stage.name, "done", model_id=cached.id, cache_hit=True))
        return StageResult(stage.name, cached, True, seconds)

    with store.staging() as work:
        out_dir, output = _build(plan, inputs, versions, store, work, report, should_cancel)
        normalized = (output.made_by or stage).lineage_form()
        model, created = store.publish(
            out_dir,
            name=stage.name,
            kind=output.kind,
            architecture=output.architecture,
            parents=[Parent(m.id, inp.relation, inp.role, inp.weight, _edge_details(inp)) for inp, m in zip(plan.inputs, inputs, strict=True)],
            recipe=normalized,
            recipe_digest=digest_json(normalized),
            versions=versions,
            origin=output.origin,
            digests=output.digests,
        )
    store.remember(key, model.id)
    seconds = time.monotonic() - started
    store.record_run(stage=stage.name, cache_key=key, model_id=model.id, cache_hit=False, seconds=seconds)
    report(ProgressEvent(stage.name, "done", model_id=model.id))
    return StageResult(stage.name, model, False, seconds, created=created)


def _build(plan: StagePlan, inputs: list[ModelRow], versions: dict, store: Store, work: Path,
           report: Reporter, should_cancel: CancelCheck) -> tuple[Path, StageOutput]:
    """Run a stage's runner into ``work/out`` and write its card; ``inputs[i]`` is the model behind ``plan.inputs[i]``."""
    stage = plan.stage
    runner = STAGE_RUNNERS[stage.kind]
    out_dir = work / "out"
    out_dir.mkdir()
    with _engine_errors(stage):
        output = runner.run(plan, [store.path_of(m) for m in inputs], out_dir, work, report, should_cancel)
    made_by = output.made_by or stage
    normalized = made_by.lineage_form()
    card_inputs = [CardInput(inp.role, inp.source.label, m.id, inp.weight) for inp, m in zip(plan.inputs, inputs, strict=True)]
    card = render_card(name=stage.name, relation=output.card_relation, summary=STAGE_RUNNERS[made_by.kind].summary(made_by), inputs=card_inputs,
                       recipe=normalized, recipe_digest=digest_json(normalized), versions=versions, library=output.library)
    (out_dir / "README.md").write_text(card, encoding="utf-8")
    return out_dir, output


def _edge_details(inp: InputRef) -> dict:
    """What a rebuild needs to pin this input: where the recipe names it, the text, and the label it had."""
    details = {"loc": inp.loc, "ref": inp.text, "label": inp.source.label}
    return details | ({"applied_to": inp.applied_to} if inp.applied_to else {})


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


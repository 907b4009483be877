"""The ``search`` stage: merge parameters searched on the search's own lines of each task file, the held-back
test lines scored once at the end; the result is the plain merge recipe the search writes, run.

The learned searcher (``merger.search.learned``) learns one coefficient per (adapter, LoRA module). What it
finds is written as a mergekit ``task_arithmetic`` merge over ``BASE+ADAPTER`` references with a per-tensor
``weight`` (conditional parameters whose filters are full tensor names), and the stage makes its output by
running that merge stage's runner. The output's card and lineage recipe are that merge stage, so
``merger run`` of the written recipe (or ``merger rebuild``) gives the same model id without searching. The
model's ``origin`` records the search: steps, objective, the scores on the search's lines and the
test-line table.
"""

from collections import Counter
from pathlib import Path

from merger.errors import Cancelled, Problem, format_loc
from merger.evaluation.datasets import DataError, Generation, read_text
from merger.evaluation.metrics import generation_accuracy
from merger.evaluation.runtimes import Transformers
from merger.planning import PlanContext, StageOutput, StagePlan
from merger.progress import CancelCheck, ProgressEvent, Reporter
from merger.recipe import AdaptersSpec, AdaptersStage, MergeStage, SearchStage
from merger.references import UnresolvedReference
from merger.stages import adapters as adapters_stage
from merger.stages import merge as merge_stage

SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
DIGITS = 6  # significant digits of a written coefficient


def summary(stage: SearchStage) -> str:
    if stage.search.searcher == "blackbox":
        from merger.stages import search_blackbox

        return search_blackbox.summary(stage)
    return f"A merge of {len(stage.search.adapters)} LoRA adapters into `{stage.search.base}` whose coefficients merger searched."


def plan(stage: SearchStage, loc: tuple, context: PlanContext) -> tuple[StagePlan | None, list[Problem]]:
    spec = stage.search
    problems: list[Problem] = []
    tasks = _task_files(stage, loc, context, problems)
    general = _general_text(stage, loc, context, problems)
    if spec.searcher == "blackbox":
        from merger.stages import search_blackbox

        return search_blackbox.plan(stage, loc, context, tasks, general, problems)
    folded = AdaptersStage(name=stage.name, adapters=AdaptersSpec(base=spec.base, mode="fold", adapters=spec.adapters,
                                                                allow_other_base=spec.allow_other_base))
    checked, adapter_problems = adapters_stage.plan(folded, loc, context)  # base and adapters, with this stage's field paths
    problems = adapter_problems + problems
    if checked is None or problems:
        return None, problems
    out_dtype = spec.out_dtype or _dtype_of(checked.output_info)
    template = written_stage(stage, [{} for _ in spec.adapters], out_dtype)
    merged, merge_problems = merge_stage.plan(template, loc, context)
    if merged is None or merge_problems:
        return None, merge_problems or [Problem(format_loc(loc), "the merge this search writes does not plan")]
    return StagePlan(stage, merged.inputs, merged.output_info, {"merge": merged.details, "tasks": tasks, "general": general,
                                                                      "out_dtype": out_dtype}), []


def _task_files(stage: SearchStage, loc: tuple, context: PlanContext, problems: list[Problem]) -> list[tuple[Path, str]]:
    """Each task file, resolved under the model roots, that splits with lines left for the search."""
    from merger.search.split import parse_lines, split_task

    tasks = []
    for j, text in enumerate(stage.search.tasks):
        try:
            path = context.resolver.data_file(text)
            split_task(path, text, parse_lines(stage.search.test_lines), choose_fraction=stage.search.learned.choose_fraction, seed=stage.seed)
            tasks.append((path, text))
        except (DataError, UnresolvedReference) as exc:
            problems.append(Problem(format_loc(loc + ("tasks", j)), str(exc)))
    return tasks


def _general_text(stage: SearchStage, loc: tuple, context: PlanContext, problems: list[Problem]) -> tuple[Path, str] | None:
    """The general text (perplexity column, optional training term), resolved under the model roots and readable."""
    if stage.search.general_text is None:
        return None
    try:
        path = context.resolver.data_file(stage.search.general_text)
        read_text(path)
        return path, stage.search.general_text
    except (DataError, UnresolvedReference) as exc:
        problems.append(Problem(format_loc(loc + ("general_text",)), str(exc)))
        return None


def _dtype_of(info) -> str | None:
    dtypes = Counter(dtype for dtype, _shape in (info.tensors.values() if info else ()))
    return SAFETENSORS_DTYPES.get(dtypes.most_common(1)[0][0]) if dtypes else None


def written_stage(stage: SearchStage, coefficients: list[dict[str, float]], out_dtype: str | None) -> MergeStage:
    """The merge stage a search writes: task arithmetic over ``BASE+ADAPTER`` with a weight per tensor.

    mergekit matches a filter as a substring of the tensor name; full names (``....layers.1.mlp.up_proj.weight``)
    match only themselves. Tensors an adapter does not touch keep its starting weight (their delta is zero).
    """
    spec = stage.search
    models = []
    for adapter, values in zip(spec.adapters, coefficients, strict=True):
        weight = [{"filter": name, "value": float(f"{value:.{DIGITS}g}")} for name, value in sorted(values.items())]
        weight.append({"value": adapter.weight})
        models.append({"model": f"{spec.base}+{adapter.path}", "parameters": {"weight": weight}})
    config = {"merge_method": "task_arithmetic", "base_model": spec.base, "models": models, "dtype": "float32"}
    if out_dtype:
        config["out_dtype"] = out_dtype
    return MergeStage(name=stage.name, merge=config, seed=stage.seed)


def run(plan: StagePlan, dirs: list[Path], out_dir: Path, work_dir: Path, report: Reporter, should_cancel: CancelCheck) -> StageOutput:
    from merger.search.learned import OBJECTIVE_NAMES, LearnOptions, learn
    from merger.search.session import open_session
    from merger.search.split import parse_lines

    stage: SearchStage = plan.stage
    spec = stage.search
    if spec.searcher == "blackbox":
        from merger.stages import search_blackbox

        return search_blackbox.run(plan, dirs, out_dir, work_dir, report, should_cancel)
    slots = plan.details["merge"]["slots"]
    base_dir = dirs[next(slot.model_input for slot in slots if slot.adapter_input is None)]
    adapter_dirs = [dirs[slot.adapter_input] for slot in slots if slot.adapter_input is not None]  # in recipe order
    session = open_session(base_dir, adapter_dirs, plan.details["tasks"], parse_lines(spec.test_lines),
                           [a.weight for a in spec.adapters], choose_fraction=spec.learned.choose_fraction, seed=stage.seed,
                           general=plan.details["general"], general_tokens=spec.learned.general_tokens if spec.learned.general_weight else 0)
    options = LearnOptions(steps=spec.budget.steps, examples_per_step=spec.learned.examples_per_step,
                           learning_rate=spec.learned.learning_rate, minutes=spec.budget.minutes,
                           check_every=spec.learned.check_every, seed=stage.seed, general_weight=spec.learned.general_weight)

    def progress(step: int, total: int, _checkpoint) -> None:
        report(ProgressEvent(stage.name, "progress", step, total, unit="steps"))

    result = learn(session.mixture, session.train, session.choose, options, pad_id=session.pad_id, general=session.general_chunks,
                   progress=progress, should_stop=should_cancel)
    if should_cancel():
        raise Cancelled(f"stage {stage.name} cancelled")
    count = len(spec.adapters)
    alone = [session.mixture.uniform([float(i == a) for i in range(count)]) for a in range(count)]
    labelled = [(str(spec.base), session.mixture.uniform([0.0] * count)),
                *((f"{spec.base} + {a.path}", values) for a, values in zip(spec.adapters, alone, strict=True)),
                ("start", session.mixture.uniform([a.weight for a in spec.adapters]))]
    rows = [{"model": label, "test": session.test_accuracy(values)} | perplexity_column(session.general_perplexity(values)) for label, values in labelled]
    coefficients, general = session.mixture.per_adapter(result.coefficients), session.general
    del session

    written = written_stage(stage, coefficients, plan.details["out_dtype"])
    merge_stage.run(StagePlan(written, plan.inputs, plan.output_info, plan.details["merge"]), dirs, out_dir, work_dir, report, should_cancel)
    rows.append(found_row(out_dir, plan.details["tasks"], parse_lines(spec.test_lines), general))
    parents = [max(row["test"][t] for row in rows[1 : 1 + count]) for t in range(len(spec.tasks))]
    record = {
        "searcher": spec.searcher,
        "objective": "worst task's exact match relative to the best parent, then the mean, then the answer log-likelihood (choosing lines)",
        "tasks": spec.tasks,
        "test_lines": spec.test_lines,
        "general_text": spec.general_text,
        "general_weight": spec.learned.general_weight,
        "steps": result.steps,
        "seconds": round(result.seconds, 1),
        "best_step": result.best.step,
        "choosing_scores": {"start": scores_record(result.start.scores), "best": scores_record(result.best.scores),
                            "parents": [scores_record(p) for p in result.parents]},
        "objective_names": list(OBJECTIVE_NAMES),
        "history": [{"step": c.step, "loss": c.loss, "objective": list(c.objective), "exact": [s.exact for s in c.scores]}
                    for c in result.history],
        "test_table": rows,  # the base, each adapter alone, the start, the found merge
        "kept": [f / p if p else None for f, p in zip(rows[-1]["test"], parents, strict=True)],
        "objective_at_best": list(result.best.objective),
    }
    return StageOutput(plan.output_info.architecture if plan.output_info else None, card_relation="merge", made_by=written,
                       origin={"search": record})


def scores_record(scores) -> list[dict]:
    return [{"exact": s.exact, "loglik": s.loglik, "examples": s.examples} for s in scores]


def found_row(model_dir: Path, tasks: list[tuple[Path, str]], test_lines: frozenset[int], general) -> dict:
    """The test-line table's last row: the written merge as stored, in float32 (perplexity with a general text)."""
    found = Transformers().load(model_dir, dtype="float32")
    return {"model": "found", "test": test_accuracy(found, tasks, test_lines)} | perplexity_column(general and general.perplexity(found))


def perplexity_column(value: float | None) -> dict:
    """A test-table row's perplexity on the general text (measured windows only), when the search names one."""
    return {} if value is None else {"perplexity": value}


def test_accuracy(lm, tasks: list[tuple[Path, str]], test_lines: frozenset[int]) -> list[float]:
    """Greedy accuracy of a loaded model on each task's test lines."""
    from merger.search.split import split_task

    out = []
    for path, label in tasks:
        examples: list[Generation] = [line.example for line in split_task(path, label, test_lines, choose_fraction=0, seed=0).test]
        out.append(generation_accuracy(lm, examples, step=lambda *_: None).values["accuracy"] if examples else float("nan"))
    return out

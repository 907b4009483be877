"""Evaluating models and their lineage on the same data, with results cached in the lineage database.

``subjects`` expands each named model into what it should be compared with: its parents (role base or
donor; adapters are not standalone models), and for a quantized model its unquantized source and the
source's parents. ``evaluate`` measures each subject on each data file, unless a stored result has the
same key (model id, metric, data sha256, settings, runtime, software versions): re-evaluating the parents
for another merge is free. On a perplexity text, the passes that compare quantized models with their source
(KL divergence) also give the source's perplexity and theirs: each model runs over the text once.
"""

from dataclasses import dataclass, field
from pathlib import Path

from merger import __version__
from merger.db import EvaluationRow, ModelRow
from merger.errors import Cancelled
from merger.evaluation import harness, metrics
from merger.evaluation.datasets import GENERATION, KL_DIVERGENCE, LM_EVAL, PERPLEXITY, DataError, DataFile, read_examples, read_text
from merger.evaluation.runtimes import (CannotEvaluate, LlamaCpp, LoadedModel, Runtime, Transformers, TransformersGGUF, adapt_threads,
                                       auto_dtype, evaluation_threads, runtime_for)
from merger.hashing import digest_json
from merger.progress import CancelCheck, ProgressEvent, Reporter, never_cancel, no_report
from merger.store import Store

MODEL_ROLES = ("base", "donor")


@dataclass(frozen=True)
class Options:
    limit: int | None = None  # examples per task file, windows of text, documents of an lm-eval task
    parents: bool = True
    dtype: str = "auto"  # transformers runtimes; auto: see runtimes.auto_dtype
    runtime: str = "auto"  # auto | transformers | llama.cpp (GGUF models)
    window: int = 512  # perplexity window, in tokens
    batch_size: int = metrics.DEFAULT_BATCH  # sequences per forward pass: windows, examples, lm-eval requests
    device: str = "cpu"  # where models run: cpu, or cuda[:N] (resolved: see merger.devices)


@dataclass(frozen=True)
class Subject:
    """A model to evaluate, how it relates to a model that was asked for, and where a GGUF's tokenizer may come from."""

    model: ModelRow
    relation: str
    tokenizer_dir: Path | None = None  # a quantized model's unquantized source (also what KL compares with)
    source_id: str | None = None


@dataclass
class Result:
    subject: Subject
    data: DataFile
    row: EvaluationRow
    cache_hit: bool


@dataclass
class Report:
    data: list[DataFile]
    subjects: list[Subject] = field(default_factory=list)
    results: list[Result] = field(default_factory=list)

    def result(self, model_id: str, data: DataFile, metric: str | None = None) -> Result | None:
        """``model_id``'s result on ``data`` for the file's own metric (or ``metric``, e.g. KL on a text)."""
        return next((r for r in self.results if r.subject.model.id == model_id and r.data == data
                     and r.row.metric == (metric or data.metric)), None)


def subjects(store: Store, models: list[ModelRow], *, parents: bool) -> list[Subject]:
    """The named models, then (unless ``parents`` is off) their parents and sources; each model once.

    Relations read "base", "donor ×0.5", "unquantized source", "base of <source>"; with several named
    models, a parent's relation also names its child.
    """
    found: dict[str, Subject] = {}

    def add(model: ModelRow, relation: str) -> None:
        if model.id not in found and model.kind == "model":
            found[model.id] = Subject(model, relation, *_unquantized(store, model))

    for model in models:
        if model.kind != "model":
            raise CannotEvaluate(f"{_name(model)} is a LoRA adapter, not a standalone model; evaluate a model it is folded into")
        add(model, "evaluated")
    for model in models if parents else []:
        of = f" of {_name(model)}" if len(models) > 1 else ""
        for edge in model.parents:
            parent = store.get(edge.parent_id)
            if edge.relation == "quantized":
                add(parent, f"unquantized source{of}")
                for source_edge in parent.parents:
                    if source_edge.role in MODEL_ROLES:
                        add(store.get(source_edge.parent_id), _parent_relation(source_edge, f" of {_name(parent)}"))
            elif edge.role in MODEL_ROLES:
                add(parent, _parent_relation(edge, of))
    return list(found.values())


def _parent_relation(edge, of: str) -> str:
    return edge.role + of + ("" if edge.weight is None else f" ×{edge.weight:g}")


def _name(model: ModelRow) -> str:
    return model.name or model.id[:12]


def _unquantized(store: Store, model: ModelRow) -> tuple[Path | None, str | None]:
    """A quantized model's unquantized source: its directory and id."""
    edge = next((e for e in model.parents if e.relation == "quantized"), None)
    return (store.path_of(store.get(edge.parent_id)), edge.parent_id) if edge else (None, None)


def evaluate(store: Store, models: list[ModelRow], data: list[DataFile], options: Options, *, stage: str = "eval",
             force: bool = False, report: Reporter = no_report,
             should_cancel: CancelCheck = never_cancel) -> Report:
    """Measure every subject on every data file (cached results are reused unless ``force``); then compare
    each quantized subject with its unquantized source on each perplexity text (KL divergence)."""
    with evaluation_threads():
        return _evaluate(store, models, data, options, stage, force, report, should_cancel)


@dataclass(frozen=True)
class _Todo:
    """A measurement no stored result has: its subject, data, metric, runtime, cache key, transformers dtype."""

    subject: Subject
    item: DataFile
    metric: str
    runtime: Runtime
    key: str
    dtype: str


@dataclass
class _Comparison:
    """Quantized models of one source on one text, with the perplexities the same passes give."""

    source_id: str
    item: DataFile
    kl: list[_Todo]
    perplexity: list[_Todo | None]  # each quantized model's, where it is still to measure
    source_perplexity: _Todo | None


def _evaluate(store: Store, models: list[ModelRow], data: list[DataFile], options: Options, stage: str, force: bool,
              report: Reporter, should_cancel: CancelCheck) -> Report:
    out = Report(data, subjects(store, models, parents=options.parents))
    todo: list[_Todo] = []
    for subject in out.subjects:
        model_dir = store.path_of(subject.model)
        if not model_dir.is_dir():
            raise CannotEvaluate(f"{_name(subject.model)}: its files are gone ({model_dir})")
        dtype = _dtype(model_dir, options)
        for item in data:
            for metric in _metrics(item, subject):
                runtime = _runtime(model_dir, item, options)
                key = _key(subject, item, metric, runtime, options, dtype)
                cached = None if force else store.evaluation(key)
                if cached is not None:
                    out.results.append(Result(subject, item, cached, True))
                else:
                    todo.append(_Todo(subject, item, metric, runtime, key, dtype))
    comparisons, todo = _comparisons(todo)
    # models the comparisons run stay loaded from their own measurements (loading Gemma 3 270M takes seconds)
    kept: dict[tuple[str, str], LoadedModel] = dict.fromkeys(
        [(c.source_id, Transformers.name) for c in comparisons] + [(t.subject.model.id, t.runtime.name) for c in comparisons for t in c.kl])
    for subject in out.subjects:
        mine = [t for t in todo if t.subject is subject]
        for name in dict.fromkeys(t.runtime.name for t in mine):
            runtime = next(t.runtime for t in mine if t.runtime.name == name)
            model_dir = store.path_of(subject.model)
            lm = runtime.load(model_dir, dtype=_dtype(model_dir, options), tokenizer_dir=subject.tokenizer_dir, device=options.device)
            for t in (t for t in mine if t.runtime.name == name):
                step = _stepper(stage, f"{_name(subject.model)} · {t.item.label}", t.metric, report, should_cancel)
                out.results.append(_saved(store, t, options, _measure(lm, t.item, options, step, store)))
            if (subject.model.id, name) in kept:
                kept[subject.model.id, name] = lm
            del lm
    for comparison in comparisons:
        source = store.get(comparison.source_id)
        out.results += _compare(store, source, comparison, options, kept,
                                _stepper(stage, f"KL from {_name(source)} · {comparison.item.label}", KL_DIVERGENCE, report, should_cancel))
    return out


def _comparisons(todo: list[_Todo]) -> tuple[list[_Comparison], list[_Todo]]:
    """The KL divergences to measure, grouped by source and text, each group taking the perplexities on its
    text of its quantized models and of the source; and what is left to measure model by model."""
    perplexities = {(t.subject.model.id, t.item): t for t in todo if t.metric == PERPLEXITY}
    groups: dict[tuple[str, DataFile], _Comparison] = {}
    for t in todo:
        if t.metric == KL_DIVERGENCE:
            group = groups.setdefault((t.subject.source_id, t.item), _Comparison(t.subject.source_id, t.item, [], [], None))
            group.kl.append(t)
            group.perplexity.append(perplexities.pop((t.subject.model.id, t.item), None))
    for (source_id, item), group in groups.items():
        group.source_perplexity = perplexities.pop((source_id, item), None)
    rest = [t for t in todo if t.metric != KL_DIVERGENCE and (t.metric != PERPLEXITY or (t.subject.model.id, t.item) in perplexities)]
    return list(groups.values()), rest


def _saved(store: Store, todo: _Todo, options: Options, measured: metrics.Measured) -> Result:
    row = _row(todo.key, todo.subject, todo.item, todo.metric, todo.runtime, options, todo.dtype, measured)
    store.save_evaluation(row)
    return Result(todo.subject, todo.item, row, False)


def _compare(store: Store, source: ModelRow, comparison: _Comparison, options: Options,
             loaded: dict[tuple[str, str], LoadedModel | None], step: metrics.Step) -> list[Result]:
    """Every quantized model of one source against it on one text, all loaded at once (or still loaded, in
    ``loaded``): the source runs once."""
    reference = loaded.get((source.id, Transformers.name)) or Transformers().load(
        store.path_of(source), dtype=_dtype(store.path_of(source), options), device=options.device)
    lms = [loaded.get((t.subject.model.id, t.runtime.name))
           or t.runtime.load(store.path_of(t.subject.model), dtype=t.dtype, tokenizer_dir=t.subject.tokenizer_dir, device=options.device)
           for t in comparison.kl]
    text = read_text(comparison.item.path)
    try:
        measured = metrics.kl_divergence(reference, lms, text, window=options.window, limit=options.limit, step=step)
        results = [] if comparison.source_perplexity is None else [_saved(store, comparison.source_perplexity, options, measured.source_perplexity)]
        for kl, perplexity, lm, kl_measured, perplexity_measured in zip(comparison.kl, comparison.perplexity, lms, measured.kl,
                                                                        measured.perplexity, strict=True):
            if perplexity is not None:  # a model that cuts the text into other windows than its source is measured on its own
                results.append(_saved(store, perplexity, options, perplexity_measured or metrics.perplexity(
                    lm, text, window=options.window, limit=options.limit, batch_size=options.batch_size, step=lambda *_: None)))
            results.append(_saved(store, kl, options, kl_measured))
    except DataError as exc:
        raise DataError(f"{comparison.item.path}: {exc}") from None
    return results


def _metrics(item: DataFile, subject: Subject) -> list[str]:
    """What is measured on ``item``: its metric, and for a quantized model's perplexity text the KL divergence."""
    return [item.metric] + ([KL_DIVERGENCE] if item.metric == PERPLEXITY and subject.source_id else [])


def _runtime(model_dir: Path, item: DataFile, options: Options) -> Runtime:
    runtime = runtime_for(model_dir, options.runtime)
    if item.metric == LM_EVAL and isinstance(runtime, LlamaCpp):
        return TransformersGGUF()  # lm-eval is given a transformers model
    return runtime


def _dtype(model_dir: Path, options: Options) -> str:
    return auto_dtype(model_dir, options.device) if options.dtype == "auto" else options.dtype


def _settings(subject: Subject, metric: str, runtime: Runtime, options: Options, dtype: str) -> dict:
    settings = {} if isinstance(runtime, LlamaCpp) else {"dtype": dtype}
    if options.device != "cpu":  # a GPU's kernels round differently: its results are kept apart from the CPU's
        settings["device"] = options.device
    if metric in (PERPLEXITY, KL_DIVERGENCE):
        settings["window"] = options.window
    if metric == KL_DIVERGENCE:
        settings |= {"source": subject.source_id, "source_dtype": _dtype(subject.tokenizer_dir, options)}
    return settings


def _versions(metric: str, runtime: Runtime) -> dict[str, str]:
    extra = harness.versions() if metric == LM_EVAL else Transformers().versions() if metric == KL_DIVERGENCE else {}
    return {"merger": __version__, **runtime.versions(), **extra}


def _key(subject: Subject, item: DataFile, metric: str, runtime: Runtime, options: Options, dtype: str) -> str:
    return digest_json({"model": subject.model.id, "metric": metric, "data": item.sha256, "limit": options.limit,
                        "settings": _settings(subject, metric, runtime, options, dtype), "runtime": runtime.name,
                        "versions": _versions(metric, runtime)})


def _row(key: str, subject: Subject, item: DataFile, metric: str, runtime: Runtime, options: Options, dtype: str,
         measured: metrics.Measured) -> EvaluationRow:
    speed = measured.tokens / measured.seconds if measured.tokens and measured.seconds > 0 else None
    return EvaluationRow(cache_key=key, model_id=subject.model.id, metric=metric, dataset=item.label, dataset_sha256=item.sha256,
                         limit=options.limit, settings=_settings(subject, metric, runtime, options, dtype), runtime=runtime.name,
                         values=measured.values, tokens_per_second=speed, seconds=measured.seconds,
                         versions=_versions(metric, runtime))


def _measure(lm: LoadedModel, item: DataFile, options: Options, step: metrics.Step, store: Store) -> metrics.Measured:
    if item.metric == LM_EVAL:
        with store.staging() as work:  # the datasets library's cache of the task data
            return harness.run_task(lm.model, lm.tokenizer, item.harness_task, limit=options.limit,
                                    batch_size=options.batch_size, cache_dir=work, step=step)
    text_or_examples = read_text(item.path) if item.metric == PERPLEXITY else read_examples(item.path, options.limit)
    try:
        if item.metric == PERPLEXITY:
            return metrics.perplexity(lm, text_or_examples, window=options.window, limit=options.limit,
                                      batch_size=options.batch_size, step=step)
        if item.metric == GENERATION:
            return metrics.generation_accuracy(lm, text_or_examples, batch_size=options.batch_size, step=step)
        return metrics.choice_accuracy(lm, text_or_examples, batch_size=options.batch_size, step=step)
    except DataError as exc:
        raise DataError(f"{item.path}: {exc}") from None


def _stepper(stage: str, what: str, metric: str, report: Reporter, should_cancel: CancelCheck) -> metrics.Step:
    unit = f"{'windows' if metric in (PERPLEXITY, KL_DIVERGENCE) else 'examples'} · {what}"

    def step(done: int, total: int) -> None:
        report(ProgressEvent(stage, "progress", done, total, unit=unit))
        adapt_threads()
        if should_cancel():
            raise Cancelled(f"evaluation cancelled ({what})")

    return step

"""One side-by-side view of an evaluation: a row per model, a column per data file, and tokens/s. Imports no
torch (the suite's runtimes do): a cached run, the web pages and the API render results without it."""

from typing import TYPE_CHECKING

from rich.table import Table

from merger.db import EvaluationRow
from merger.evaluation.datasets import CHOICE, GENERATION, KL_DIVERGENCE, LM_EVAL, PERPLEXITY, DataFile
from merger.formatting import human_size

if TYPE_CHECKING:
    from merger.evaluation.suite import Report, Result

HEADINGS = {PERPLEXITY: "ppl", GENERATION: "acc", CHOICE: "mc acc", LM_EVAL: "lm-eval"}


def headline(row: EvaluationRow) -> float:
    """The one number a result shows in a table."""
    if row.metric == PERPLEXITY:
        return row.values["perplexity"]
    if row.metric == KL_DIVERGENCE:
        return row.values["kl_divergence"]
    if row.metric == LM_EVAL:
        return row.values["metrics"][row.values["primary"]]
    return row.values["accuracy"]


def tokens_per_second(results: "list[Result]") -> float | None:
    """Throughput over every measurement of a model that counted tokens."""
    timed = [r.row for r in results if r.row.tokens_per_second]
    seconds = sum(row.seconds for row in timed)
    return sum(row.tokens_per_second * row.seconds for row in timed) / seconds if seconds else None


def render(report: "Report", title: str | None = None) -> Table:
    """A row per model; a column per data file, then for each text a quantized model was compared on, its KL
    divergence from the unquantized source and their top-1 agreement; then tokens/s."""
    table = Table(title=title)
    compared = [item for item in report.data if any(r.data == item and r.row.metric == KL_DIVERGENCE for r in report.results)]
    for heading in ("model", "id", "relation", "runtime", "size"):
        table.add_column(heading, no_wrap=True)
    headings = [*map(_heading, report.data), *(f"{h}\n{_name(item)}" for item in compared for h in ("KL", "top-1")), "tokens/s"]
    for heading in headings:
        table.add_column(heading, justify="right", no_wrap=True)
    for subject in report.subjects:
        results = [r for r in report.results if r.subject.model.id == subject.model.id]
        cells = []
        for item in report.data:
            result = report.result(subject.model.id, item)
            cells.append("" if result is None else f"{headline(result.row):.{2 if item.metric == PERPLEXITY else 3}f}")
        for item in compared:
            result = report.result(subject.model.id, item, KL_DIVERGENCE)
            values = result.row.values if result else None
            cells += ["", ""] if values is None else [f"{values['kl_divergence']:.4f}", f"{values['top1_agreement']:.1%}"]
        speed = tokens_per_second([r for r in results if r.row.metric != KL_DIVERGENCE])
        table.add_row(subject.model.name or "", subject.model.id[:12], subject.relation,
                      ", ".join(sorted({r.row.runtime for r in results})), human_size(subject.model.size_bytes),
                      *cells, "" if speed is None else f"{speed:.0f}")
    return table


def as_json(report: "Report") -> dict:
    return {
        "data": [{"label": d.label, "metric": d.metric, "sha256": d.sha256} for d in report.data],
        "models": [
            {"id": s.model.id, "name": s.model.name, "relation": s.relation, "size_bytes": s.model.size_bytes,
             "results": [result_json(r) for r in report.results if r.subject.model.id == s.model.id]}
            for s in report.subjects
        ],
    }


def result_json(result: "Result") -> dict:
    return row_json(result.row) | {"cache_hit": result.cache_hit}


def row_json(row: EvaluationRow) -> dict:
    return {"dataset": row.dataset, "metric": row.metric, "value": headline(row), "values": row.values,
            "runtime": row.runtime, "limit": row.limit, "settings": row.settings, "dataset_sha256": row.dataset_sha256,
            "tokens_per_second": row.tokens_per_second, "seconds": row.seconds, "versions": row.versions,
            "created_at": row.created_at.isoformat()}


def _heading(item: DataFile) -> str:
    return f"{HEADINGS[item.metric]}\n{_name(item)}"


def _name(item: DataFile) -> str:
    return item.harness_task.name if item.metric == LM_EVAL else item.label.rsplit("/", 1)[-1]



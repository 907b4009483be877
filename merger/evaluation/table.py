"""One side-by-side view of an evaluation: a row per model, a column per data file, and tokens/s."""

from rich.table import Table

from merger.db import EvaluationRow
from merger.evaluation.datasets import CHOICE, GENERATION, LM_EVAL, PERPLEXITY, DataFile
from merger.evaluation.suite import Report, Result
from merger.formatting import human_size

HEADINGS = {PERPLEXITY: "ppl", GENERATION: "acc", CHOICE: "mc acc", LM_EVAL: "lm-eval"}


def headline(row: EvaluationRow) -> float:
    """The one number a result shows in a table."""
    if row.metric == PERPLEXITY:
        return row.values["perplexity"]
    if row.metric == LM_EVAL:
        return row.values["metrics"][row.values["primary"]]
    return row.values["accuracy"]


def tokens_per_second(results: list[Result]) -> float | None:
    """Throughput over every measurement of a model that counted tokens."""
    timed = [r.row for r in results if r.row.tokens_per_second]
    seconds = sum(row.seconds for row in timed)
    return sum(row.tokens_per_second * row.seconds for row in timed) / seconds if seconds else None


def render(report: Report, title: str | None = None) -> Table:
    table = Table(title=title)
    for heading in ("model", "id", "relation", "runtime", "size"):
        table.add_column(heading, no_wrap=True)
    for heading in [*map(_heading, report.data), "tokens/s"]:
        table.add_column(heading, justify="right", no_wrap=True)
    for subject in report.subjects:
        results = [r for r in report.results if r.subject.model.id == subject.model.id]
        cells = []
        for item in report.data:
            result = report.result(subject.model.id, item)
            cells.append("" if result is None else f"{headline(result.row):.{2 if item.metric == PERPLEXITY else 3}f}")
        speed = tokens_per_second(results)
        table.add_row(subject.model.name or "", subject.model.id[:12], subject.relation,
                      ", ".join(sorted({r.row.runtime for r in results})), human_size(subject.model.size_bytes),
                      *cells, "" if speed is None else f"{speed:.0f}")
    return table


def as_json(report: Report) -> dict:
    return {
        "data": [{"label": d.label, "metric": d.metric, "sha256": d.sha256} for d in report.data],
        "models": [
            {"id": s.model.id, "name": s.model.name, "relation": s.relation, "size_bytes": s.model.size_bytes,
             "results": [result_json(r) for r in report.results if r.subject.model.id == s.model.id]}
            for s in report.subjects
        ],
    }


def result_json(result: Result) -> dict:
    return row_json(result.row) | {"cache_hit": result.cache_hit}


def row_json(row: EvaluationRow) -> dict:
    return {"dataset": row.dataset, "metric": row.metric, "value": headline(row), "values": row.values,
            "runtime": row.runtime, "limit": row.limit, "settings": row.settings, "dataset_sha256": row.dataset_sha256,
            "tokens_per_second": row.tokens_per_second, "seconds": row.seconds, "versions": row.versions,
            "created_at": row.created_at.isoformat()}


def _heading(item: DataFile) -> str:
    name = item.harness_task.name if item.metric == LM_EVAL else item.label.rsplit("/", 1)[-1]
    return f"{HEADINGS[item.metric]}\n{name}"



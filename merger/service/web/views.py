"""What the web pages show of models, beyond the API's own answers: relations, cards, evaluation tables, comparisons."""

import difflib
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from markdown_it import MarkdownIt
from sqlalchemy import select

from merger import graph
from merger.access import can_see, owns
from merger.db import GrantRow, ModelRow
from merger.evaluation.table import HEADINGS, headline
from merger.service.deps import Service
from merger.service.lookups import model_out
from merger.service.schemas import ModelOut

RELATIONS = ("base", "adapter", "fine-tune", "merge", "quantized")
CARD_MARKDOWN = MarkdownIt("commonmark", {"html": False}).enable("table")  # no raw HTML from a card reaches the page


def relation_of(model: ModelOut) -> str:
    """How a model came about: base (no parents), adapter, fine-tune (an adapter folded in), merge or quantized."""
    if model.kind in ("adapter", "placeholder"):
        return model.kind
    relations = {p.relation for p in model.parents}
    for relation, shown in (("quantized", "quantized"), ("merge", "merge"), ("finetune", "fine-tune"), ("adapter", "fine-tune")):
        if relation in relations:
            return shown
    return "base"


def card_html(svc: Service, model: ModelRow) -> tuple[str, str]:
    """The model card (README.md): its front matter as text, its body as HTML; empty when there is none."""
    entry = next((f for f in model.files if f.path == "README.md"), None)
    if entry is None:
        return "", ""
    text = (svc.store.path_of(model) / "README.md").read_text(encoding="utf-8", errors="replace")
    front = ""
    if text.startswith("---\n") and "\n---\n" in text[4:]:
        front, text = text[4:].split("\n---\n", 1)
    return front, CARD_MARKDOWN.render(text)


def recipe_yaml(model: ModelRow) -> str:
    """The stage recipe that made the model, as stored."""
    return yaml.safe_dump(model.recipe, sort_keys=False, allow_unicode=True) if model.recipe else ""


def new_recipe_yaml(model: ModelRow) -> str:
    """That stage as a recipe of its own, to edit and run again."""
    return yaml.safe_dump({"stages": [model.recipe]}, sort_keys=False, allow_unicode=True) if model.recipe else ""


def hub_repo(svc: Service, model: ModelRow, user: str) -> str | None:
    """OWNER/NAME under which the Hub-compatible routes serve the model (the user's own name first), if any."""
    if not model.name:
        return None
    with svc.store.session() as s:
        if owns(s, model.id, user):
            return f"{user}/{model.name}"
        owner = s.scalars(select(GrantRow.user).where(GrantRow.model_id == model.id, GrantRow.owner.is_(True))
                          .order_by(GrantRow.user)).first()
    return f"{owner}/{model.name}" if owner else None


def user_owns(svc: Service, model_id: str, user: str) -> bool:
    with svc.store.session() as s:
        return owns(s, model_id, user)


@dataclass
class ScoreTable:
    """Models as rows, (data file, metric) as columns; each cell the newest headline number, or None."""

    columns: list[tuple[str, str]] = field(default_factory=list)
    rows: list[tuple[ModelOut, str, list[float | None]]] = field(default_factory=list)  # model, its part, values

    def heading(self, column: tuple[str, str]) -> str:
        dataset, metric = column
        return f"{Path(dataset).name} ({HEADINGS.get(metric, metric)})"

    def chart_data(self) -> dict:
        return {"columns": [self.heading(c) for c in self.columns],
                "models": [{"label": f"{m.name or m.id[:12]} ({part})", "values": values} for m, part, values in self.rows]}


def score_table(svc: Service, subjects: list[tuple[ModelOut, str]]) -> ScoreTable:
    latest: dict[str, dict[tuple[str, str], float]] = {}
    for model, _part in subjects:
        for row in svc.store.evaluations(model.id):  # oldest first: the newest of each column wins
            latest.setdefault(model.id, {})[(row.dataset, row.metric)] = headline(row)
    columns = sorted({c for values in latest.values() for c in values})
    rows = [(m, part, [latest.get(m.id, {}).get(c) for c in columns]) for m, part in subjects]
    return ScoreTable(columns, rows)


def evaluation_subjects(svc: Service, model: ModelOut, user: str) -> list[tuple[ModelOut, str]]:
    """The model beside its parents (base, donors) and the quantized files made from it, as `merger eval` shows them."""
    parents = [(model_out(svc, svc.store.get(p.id), user), p.role) for p in model.parents
               if p.kind == "model" and p.role in ("base", "donor")]
    lineage = graph.descendants(svc.store, model.id)
    with svc.store.session() as s:
        quantized = [e.child for e in lineage.edges if e.parent == model.id and e.relation == "quantized" and can_see(s, e.child, user)]
    return [*parents, (model, "this model"), *[(model_out(svc, svc.store.get(i), user), "quantized") for i in quantized]]


def common_ancestors(svc: Service, a: str, b: str, user: str) -> list[graph.Node]:
    """Models both descend from (each itself included), that the user may see; nearest to ``a`` first."""
    with svc.store.session() as s:
        def seen(model_id: str) -> graph.Lineage:
            return graph.visible_part(graph.ancestors(svc.store, model_id), lambda i: can_see(s, i, user))
        of_a, of_b = seen(a), seen(b)
    return [node for i, node in of_a.nodes.items() if i in of_b.nodes and not node.hidden]


def recipe_diff(a: str, b: str, names: tuple[str, str]) -> list[tuple[str, str]]:
    """A unified diff of two recipes as (kind, line): kind is add, remove, hunk (and the two file names) or same."""
    kinds = {"+": "add", "-": "remove", "@": "hunk"}
    lines = list(difflib.unified_diff(a.splitlines(), b.splitlines(), fromfile=names[0], tofile=names[1], lineterm=""))
    return [("hunk", line) for line in lines[:2]] + [(kinds.get(line[:1], "same"), line) for line in lines[2:]]


def search_history(model: ModelRow) -> list[dict] | None:
    """A searched model's trials: step and objective (worst task relative to the best parent, mean), if any."""
    history = ((model.origin or {}).get("search") or {}).get("history")
    if not history:
        return None
    return [{"step": h["step"], "worst": h["objective"][0], "mean": h["objective"][1]} for h in history]


"""Lineage graph queries, shared by the CLI and the API: a model's ancestors, its descendants, the path
between two models, the part of them a user may see, and their renderings as JSON, Mermaid and DOT.

An edge runs from a child to a parent (an input it was made from) and carries the relation, the role, the
weight, where the recipe named the input (``loc``, ``ref``) and the child's recipe digest; the parent id is
the exact content id that was read.
"""

from collections.abc import Callable
from dataclasses import dataclass, replace

from sqlalchemy import select

from merger.db import EdgeRow, ModelRow
from merger.errors import MergerError
from merger.store import PLACEHOLDER, Store

DIRECTIONS = ("ancestors", "descendants")
FORMATS = ("json", "mermaid", "dot")


@dataclass(frozen=True)
class Node:
    id: str
    name: str | None = None
    kind: str | None = None
    hub_id: str | None = None
    recipe_digest: str | None = None
    inputs: tuple[str, ...] = ()  # every parent id, in recipe order (also those outside this graph)
    hidden: bool = False  # a model the asking user may not see: only its id is shown


@dataclass(frozen=True)
class Edge:
    child: str
    parent: str
    relation: str
    role: str
    weight: float | None
    position: int
    ref: str | None  # the reference as the recipe wrote it (or the label a card gave)
    loc: str | None  # where the recipe wrote it


@dataclass(frozen=True)
class Lineage:
    root: str
    direction: str  # ancestors | descendants: the way edges are followed from the root
    target: str | None  # set for the path between root and target
    nodes: dict[str, Node]  # in the order reached
    edges: list[Edge]

    def next_of(self, node_id: str) -> list[tuple[Edge, str]]:
        """The edges leaving ``node_id`` in this lineage's direction, with the node at their other end."""
        if self.direction == "ancestors":
            return [(e, e.parent) for e in self.edges if e.child == node_id]
        return [(e, e.child) for e in self.edges if e.parent == node_id]


class NoPath(MergerError):
    """Neither of two models descends from the other."""


class NotVisible(MergerError):
    """The path between two models passes a model the user may not see."""


# --- queries ------------------------------------------------------------------------------------------------


def ancestors(store: Store, model_id: str) -> Lineage:
    return _walk(store, model_id, "ancestors")


def descendants(store: Store, model_id: str) -> Lineage:
    return _walk(store, model_id, "descendants")


def between(store: Store, start: str, end: str) -> Lineage:
    """Every model and edge on the lineage paths from ``start`` to ``end``, whichever descends from the other."""
    for direction in DIRECTIONS:
        reached = _walk(store, start, direction)
        if end in reached.nodes:
            back = _reachable(reached, end, reverse=True)
            return Lineage(start, direction, end, {i: n for i, n in reached.nodes.items() if i in back},
                           [e for e in reached.edges if e.child in back and e.parent in back])
    raise NoPath(f"no lineage path between {start[:12]} and {end[:12]}: neither descends from the other")


def _walk(store: Store, root: str, direction: str) -> Lineage:
    """Breadth first from ``root``; each model once, however many paths reach it."""
    order, edges, frontier = [root], [], [root]
    with store.session() as s:
        while frontier:
            found = [_edge(row) for node in frontier for row in s.execute(_edges_query(node, direction))]
            edges += found
            reached = dict.fromkeys(e.parent if direction == "ancestors" else e.child for e in found)
            frontier = [n for n in reached if n not in order]
            order += frontier
        nodes = _nodes(s, order)
    return Lineage(root, direction, None, nodes, edges)


def _edges_query(node: str, direction: str):
    columns = select(EdgeRow.child_id, EdgeRow.parent_id, EdgeRow.relation, EdgeRow.role, EdgeRow.weight, EdgeRow.position,
                     EdgeRow.details)
    if direction == "ancestors":
        return columns.where(EdgeRow.child_id == node).order_by(EdgeRow.position)
    return (columns.join(ModelRow, ModelRow.id == EdgeRow.child_id).where(EdgeRow.parent_id == node)
            .order_by(ModelRow.created_at, EdgeRow.child_id, EdgeRow.position))


def _edge(row) -> Edge:
    details = row.details or {}
    return Edge(row.child_id, row.parent_id, row.relation, row.role, row.weight, row.position,
                details.get("ref") or details.get("label"), details.get("loc"))


def _nodes(s, ids: list[str]) -> dict[str, Node]:
    rows = {r.id: r for r in s.execute(select(ModelRow.id, ModelRow.name, ModelRow.kind, ModelRow.origin, ModelRow.recipe_digest)
                                       .where(ModelRow.id.in_(ids)))}
    inputs: dict[str, list[str]] = {}
    for child, parent in s.execute(select(EdgeRow.child_id, EdgeRow.parent_id).where(EdgeRow.child_id.in_(ids)).order_by(EdgeRow.position)):
        inputs.setdefault(child, []).append(parent)
    return {i: Node(i, rows[i].name, rows[i].kind, (rows[i].origin or {}).get("hub_id"), rows[i].recipe_digest, tuple(inputs.get(i, ())))
            for i in ids}


def _reachable(lineage: Lineage, start: str, *, reverse: bool = False) -> set[str]:
    """The nodes reached from ``start`` along the lineage's direction (against it with ``reverse``)."""
    to_parents = (lineage.direction == "ancestors") != reverse
    step: dict[str, list[str]] = {}
    for e in lineage.edges:
        origin, target = (e.child, e.parent) if to_parents else (e.parent, e.child)
        step.setdefault(origin, []).append(target)
    seen, todo = {start}, [start]
    while todo:
        for other in step.get(todo.pop(), []):
            if other not in seen:
                seen.add(other)
                todo.append(other)
    return seen


# --- what a user may see ------------------------------------------------------------------------------------


def visible_part(lineage: Lineage, visible: Callable[[str], bool]) -> Lineage:
    """The part of a lineage a user may see; its root (and target) must be visible to them.

    Ancestors: a model they may not see keeps only its id (``hidden``), and its own ancestors are left out.
    Descendants: models they may not see are left out, with what is reached only through them.
    A path that passes a model they may not see raises ``NotVisible``.
    """
    if lineage.target is not None:
        if not all(visible(i) for i in lineage.nodes):
            raise NotVisible(f"the path from {lineage.root[:12]} to {lineage.target[:12]} passes models you may not see")
        return lineage
    shown = {i for i in lineage.nodes if visible(i)}
    pruned = replace(lineage, edges=[e for e in lineage.edges if e.child in shown])  # nothing is followed past a hidden model
    kept = _reachable(pruned, lineage.root)
    nodes = {i: n if i in shown else Node(i, hidden=True) for i, n in lineage.nodes.items() if i in kept}
    return replace(pruned, nodes=nodes, edges=[e for e in pruned.edges if e.child in kept and e.parent in kept])


# --- renderings ---------------------------------------------------------------------------------------------


def to_json(lineage: Lineage) -> dict:
    """Nodes and edges; each edge with its child's recipe digest; each node with all its input ids."""
    digests = {i: n.recipe_digest for i, n in lineage.nodes.items()}
    return {
        "root": lineage.root,
        "direction": lineage.direction,
        "to": lineage.target,
        "nodes": [_node_json(n) for n in lineage.nodes.values()],
        "edges": [{"child": e.child, "parent": e.parent, "relation": e.relation, "role": e.role, "weight": e.weight,
                   "position": e.position, "recipe_digest": digests.get(e.child), "ref": e.ref, "loc": e.loc}
                  for e in lineage.edges],
    }


def _node_json(node: Node) -> dict:
    if node.hidden:
        return {"id": node.id, "hidden": True}
    return {"id": node.id, "name": node.name, "kind": node.kind, "hub_id": node.hub_id, "recipe_digest": node.recipe_digest,
            "inputs": list(node.inputs), "hidden": False}


def edge_label(edge: Edge) -> str:
    return f"{edge.relation}/{edge.role}" + ("" if edge.weight is None else f" w={edge.weight:g}")


def node_label(node: Node) -> str:
    if node.hidden:
        return f"hidden ({node.id[:12]})"
    return f"{node.name or 'unnamed'} ({node.id[:12]}, {node.kind})"


def to_mermaid(lineage: Lineage) -> str:
    """A Mermaid flowchart, parents above children; node ids are ``m`` + hex, labels quoted and escaped."""
    ids = _short_ids(lineage)
    lines = ["graph TD"]
    lines += [f'    {ids[n.id]}["{_mermaid_text(node_label(n))}"]' for n in lineage.nodes.values()]
    lines += [f'    {ids[e.parent]} -->|"{_mermaid_text(edge_label(e))}"| {ids[e.child]}' for e in lineage.edges]
    placeholders = [ids[n.id] for n in lineage.nodes.values() if n.kind == PLACEHOLDER]
    hidden = [ids[n.id] for n in lineage.nodes.values() if n.hidden]
    for kind, members in (("placeholder", placeholders), ("hidden", hidden)):
        if members:
            lines += [f"    classDef {kind} stroke-dasharray: 4 4", f"    class {','.join(members)} {kind}"]
    return "\n".join(lines) + "\n"


def to_dot(lineage: Lineage) -> str:
    """A Graphviz digraph, parents above children; nodes by full id."""
    lines = ["digraph lineage {", "    node [shape=box];"]
    for n in lineage.nodes.values():
        style = ", style=dashed" if n.hidden or n.kind == PLACEHOLDER else ""
        lines.append(f'    "{n.id}" [label="{_dot_text(node_label(n))}"{style}];')
    lines += [f'    "{e.parent}" -> "{e.child}" [label="{_dot_text(edge_label(e))}"];' for e in lineage.edges]
    return "\n".join(lines + ["}"]) + "\n"


def _short_ids(lineage: Lineage) -> dict[str, str]:
    """``m`` + the shortest id prefix (12 digits or more) unique in this graph: a safe Mermaid node id."""
    width = 12
    while len({i[:width] for i in lineage.nodes}) < len(lineage.nodes):
        width += 4
    return {i: f"m{i[:width]}" for i in lineage.nodes}


def _mermaid_text(text: str) -> str:
    return text.replace("&", "#amp;").replace('"', "#quot;").replace("<", "#lt;").replace(">", "#gt;")


def _dot_text(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def render(lineage: Lineage, fmt: str) -> str:
    """``fmt``: mermaid or dot (JSON is ``to_json``)."""
    return {"mermaid": to_mermaid, "dot": to_dot}[fmt](lineage)

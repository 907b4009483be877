"""The README.md merger writes into every model it produces: Hub model-tree front matter plus provenance.

Deterministic (no timestamps), because it is part of the content that names the model. It depends only on
the stage recipe, the inputs (role, label, content id, weight) and the software versions, all recorded in
the lineage database, so a rebuild writes the same card.
"""

from dataclasses import dataclass

import yaml

from merger.db import ModelRow


@dataclass(frozen=True)
class CardInput:
    role: str  # base | donor | tokenizer | adapter
    label: str  # see model_label; recorded with the edge, so later renames don't change a rebuilt card
    model_id: str
    weight: float | None


def model_label(model: ModelRow) -> str:
    """How a model appears in ``base_model``: its Hub id when it has one, else its store name or id."""
    origin = model.origin or {}
    return origin.get("hub_id") or model.name or model.id


def render_card(*, name: str, relation: str, summary: str, inputs: list[CardInput], recipe: dict, recipe_digest: str,
                versions: dict, library: str = "transformers") -> str:
    """``inputs`` in recipe order; ``base_model`` lists the base and donor labels (adapters are in the table)."""
    labels = list(dict.fromkeys(i.label for i in inputs if i.role in ("base", "donor")))
    front = {
        "base_model": labels,
        "base_model_relation": relation,
        "library_name": library,
        "tags": ["merger", relation],
    }
    rows = "\n".join(f"| {i.role} | {i.label} | `{i.model_id}` | {'' if i.weight is None else i.weight} |" for i in inputs)
    version_rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(versions.items()))
    return (
        f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n"
        f"# {name}\n\n{summary}\n\n"
        f"## Recipe\n\n```yaml\n{yaml.safe_dump(recipe, sort_keys=False)}```\n\n"
        f"Recipe digest (sha256 of its canonical JSON): `{recipe_digest}`\n\n"
        f"## Provenance\n\nInputs, by content id (sha256 of the file manifest); `merger rebuild` re-runs the recipe on exactly these:\n\n"
        f"| role | model | id | weight |\n|---|---|---|---|\n{rows}\n\n"
        f"| software | version |\n|---|---|\n{version_rows}\n"
    )

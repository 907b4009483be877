"""The README.md merger writes into every model it produces: Hub model-tree front matter plus provenance.

Deterministic (no timestamps), because it is part of the content that names the model.
"""

import yaml

from merger.db import ModelRow


def parent_label(model: ModelRow) -> str:
    """How a parent appears in ``base_model``: its Hub id when it has one, else its store name or id."""
    origin = model.origin or {}
    return origin.get("hub_id") or model.name or model.id


def render_card(*, name: str, relation: str, summary: str, parents: list[tuple[str, ModelRow, float | None]],
                recipe: dict, versions: dict, library: str = "transformers") -> str:
    """``parents``: (role, model, weight) in recipe order."""
    labels = list(dict.fromkeys(parent_label(m) for role, m, _ in parents if role in ("base", "donor")))
    front = {
        "base_model": labels,
        "base_model_relation": relation,
        "library_name": library,
        "tags": ["merger", relation],
    }
    rows = "\n".join(
        f"| {role} | {m.name or ''} | `{m.id}` | {'' if weight is None else weight} |" for role, m, weight in parents
    )
    version_rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(versions.items()))
    return (
        f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n"
        f"# {name}\n\n{summary}\n\n"
        f"## Recipe\n\n```yaml\n{yaml.safe_dump(recipe, sort_keys=False)}```\n\n"
        f"## Provenance\n\nInputs, by content id (sha256 of the file manifest):\n\n"
        f"| role | name | id | weight |\n|---|---|---|---|\n{rows}\n\n"
        f"| software | version |\n|---|---|\n{version_rows}\n"
    )

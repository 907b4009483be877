"""Registering external models: a community model or adapter, from a directory under the model roots or the
local Hugging Face cache, copied into the store by content id, with the parents its card names.

Parents come from ``--parent`` if given, else the card's front matter (``base_model``, a Hub id or a list),
else an adapter's ``adapter_config.json`` (``base_model_name_or_path``). The relation is the card's
``base_model_relation`` or, as the Hub infers it: adapter (an ``adapter_config.json``), merge (several base
models), else finetune.

Registration happens as a *viewer* (a user of the service; None: the local command line, which sees the whole
store). A parent label is looked up among the models the viewer may see: as a Hub id of a registered model,
then as a store id, prefix or name. A label not found becomes a *placeholder*: a row of kind ``placeholder``
without files, named by the label, whose id digests the label and the viewer (``placeholder_id``), so every
model that viewer registers naming that parent shares it. Registering a model with that Hub id or name, as
the same viewer, fills it: the edges to the placeholder move to the model and the placeholder goes. Another
user's placeholders are never filled, and bytes already stored keep their name and owners.
"""

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from merger.access import as_seen_by
from merger.db import EdgeRow, ModelRow, add_unless_exists
from merger.errors import MergerError
from merger.hashing import manifest, manifest_id
from merger.modelfiles import ModelDirError, inspect_dir
from merger.references import HUB_ID, Resolver, Source
from merger.safe_yaml import load_untrusted_yaml
from merger.settings import Settings
from merger.store import PLACEHOLDER, Parent, Store

RELATIONS = ("adapter", "merge", "quantized", "finetune")
FRONT_MATTER = re.compile(r"\A---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", re.S)


@dataclass(frozen=True)
class ParentLink:
    label: str
    model_id: str
    relation: str
    role: str
    placeholder: bool


@dataclass(frozen=True)
class Registration:
    model: ModelRow
    created: bool  # False: the same bytes were in the store already, and are left as they were
    parents: list[ParentLink]
    filled: list[str]  # labels of the placeholders this model replaced


@dataclass(frozen=True)
class _Declared:
    labels: list[str]
    relation: str
    where: str  # the file or option the parents came from


def placeholder_id(label: str, viewer: str | None = None) -> str:
    """The placeholder for ``label`` of the models ``viewer`` registers (None: the local command line's)."""
    key = f"placeholder:{label}" if viewer is None else f"placeholder:{json.dumps([viewer, label])}"  # unambiguous
    return hashlib.sha256(key.encode()).hexdigest()


def register(settings: Settings, store: Store, source: str, *, name: str, parents: list[str] | None = None,
             relation: str | None = None, viewer: str | None = None) -> Registration:
    """Copy the model or adapter at ``source`` (DIR or ``org/name[@rev]``) into the store and link its parents.

    Parents are looked up as ``viewer`` sees the store. Bytes already stored are left as they are (name, parents,
    owners; ``created`` is False), but still fill the viewer's placeholders for ``name``.
    """
    found = _locate(Resolver(settings, store), source)
    path = found.path
    adapter = (path / "adapter_config.json").is_file()
    try:
        info = inspect_dir(path, adapter=adapter)
    except ModelDirError as exc:
        raise MergerError(str(exc)) from None
    declared = _declared(path, adapter, parents, relation, settings.max_recipe_bytes)
    origin = _origin(found)
    with store.staging() as work:
        staged = _copy(path, work / "model", _symlink_roots(found, settings))
        model_id = manifest_id(manifest(staged))
        existing = store.get(model_id)
        created = existing is None or existing.location is not None  # new, or known only as a recipe's input directory
        links = _link_parents(store, declared, model_id, {name, origin.get("hub_id")}, viewer) if created else []
        model, created = store.publish(staged, name=name, kind="adapter" if adapter else "model", architecture=info.architecture,
                                       parents=links, origin=origin)
    filled = _fill_placeholders(store, model.id, {name, origin.get("hub_id")}, viewer)
    model = store.get(model.id)  # with its edges as they are now
    return Registration(model, created, _parent_links(model), filled)


def _locate(resolver: Resolver, text: str) -> Source:
    """A directory under the model roots, or ``org/name[@rev]`` from the local Hugging Face cache."""
    repo, at, revision = text.partition("@")
    return resolver.external(repo, revision) if at and HUB_ID.match(repo) else resolver.external(text)


def _origin(source: Source) -> dict:
    if source.kind != "hub":
        return {"source": str(source.path)}
    repo, _, revision = source.hub_id.partition("@")
    return {"hub_id": repo, "revision": revision or None, "commit": source.path.name, "source": str(source.path)}


def _symlink_roots(source: Source, settings: Settings) -> list[Path]:
    """Where the files being registered may point: the model roots, or the Hub cache folder of that repo."""
    return [source.path.parent.parent.resolve()] if source.kind == "hub" else settings.model_roots


def _copy(source: Path, dest: Path, allowed: list[Path]) -> Path:
    """The files of ``source`` (hidden ones skipped, as the manifest skips them), symlinks followed only into ``allowed``."""
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        real = path.resolve()
        if not any(real.is_relative_to(root) for root in allowed):
            raise MergerError(f"{path} links to {real}, outside {', '.join(map(str, allowed))}")
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(real, target)
    return dest


# --- what the model says it came from ----------------------------------------------------------------------


def _declared(path: Path, adapter: bool, explicit: list[str] | None, relation: str | None, max_bytes: int) -> _Declared:
    card = card_metadata(path / "README.md", max_bytes)
    if explicit:
        labels, where = list(explicit), "--parent"
    else:
        labels, where = _card_labels(card.get("base_model"), path / "README.md"), "README.md"
        if not labels and adapter:
            made_for = _adapter_base(path / "adapter_config.json")
            labels, where = ([made_for] if made_for else []), "adapter_config.json"
    if relation is not None:
        return _Declared(labels, _checked_relation(relation, "--relation"), where)
    given = card.get("base_model_relation")
    if given is not None:
        return _Declared(labels, _checked_relation(given, f"{path / 'README.md'}: base_model_relation"), where)
    return _Declared(labels, "adapter" if adapter else "merge" if len(labels) > 1 else "finetune", where)


def card_metadata(readme: Path, max_bytes: int) -> dict:
    """A model card's YAML front matter (``---`` ... ``---`` at the top), or {} without one."""
    if not readme.is_file():
        return {}
    match = FRONT_MATTER.match(readme.read_text(encoding="utf-8", errors="replace"))
    if match is None:
        return {}
    if len(match.group(1)) > max_bytes:
        raise MergerError(f"{readme}: front matter over {max_bytes} bytes")
    data = load_untrusted_yaml(match.group(1), source=str(readme))
    if data is not None and not isinstance(data, dict):
        raise MergerError(f"{readme}: front matter is not a mapping")
    return data or {}


def _card_labels(value, readme: Path) -> list[str]:
    values = [value] if isinstance(value, str) else value if isinstance(value, list) else [] if value is None else None
    if values is None or not all(isinstance(v, str) and v.strip() for v in values):
        raise MergerError(f"{readme}: base_model must be a Hub id or a list of them, not {value!r}")
    return list(dict.fromkeys(v.strip() for v in values))


def _adapter_base(config_path: Path) -> str | None:
    made_for = json.loads(config_path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    return made_for.strip() if isinstance(made_for, str) and made_for.strip() else None


def _checked_relation(value, where: str) -> str:
    if value not in RELATIONS:
        raise MergerError(f"{where} {value!r} is not one of {', '.join(RELATIONS)}")
    return value


# --- parents and placeholders ------------------------------------------------------------------------------


def _link_parents(store: Store, declared: _Declared, model_id: str, own_labels: set[str | None], viewer: str | None) -> list[Parent]:
    """An edge per declared parent, to a model the viewer may see or to their placeholder (created here); never to
    the model itself."""
    role = "donor" if declared.relation == "merge" else "base"
    with store.session.begin() as s:
        ids = {label: _parent_id(s, store, label, viewer) for label in declared.labels if label not in own_labels}
    return [Parent(parent_id, declared.relation, role, None, {"label": label, "declared_in": declared.where})
            for label, parent_id in ids.items() if parent_id != model_id]


def _parent_id(s: Session, store: Store, label: str, viewer: str | None) -> str:
    registered = select(ModelRow.id).where(ModelRow.kind != PLACEHOLDER, ModelRow.origin["hub_id"].as_string() == label)
    by_hub_id = s.scalars(as_seen_by(registered, viewer).limit(1)).first()
    if by_hub_id:
        return by_hub_id
    known = store.find(label, viewer=viewer)
    if known is not None and known.kind != PLACEHOLDER:
        return known.id
    placeholder = placeholder_id(label, viewer)  # the viewer's own, whoever else has one for the label
    add_unless_exists(s, ModelRow(id=placeholder, name=label, kind=PLACEHOLDER, size_bytes=0, origin={"placeholder_for": label}))
    return placeholder


def _fill_placeholders(store: Store, model_id: str, labels: set[str | None], viewer: str | None) -> list[str]:
    """Move the edges of the viewer's placeholders for ``labels`` (the name and Hub id the model was registered as)
    onto the model; drop those placeholders."""
    filled = []
    with store.session.begin() as s:
        for label in sorted(label for label in labels if label):
            placeholder = s.get(ModelRow, placeholder_id(label, viewer))
            if placeholder is None:
                continue
            s.execute(update(EdgeRow).where(EdgeRow.parent_id == placeholder.id).values(parent_id=model_id))
            s.delete(placeholder)
            filled.append(label)
    return filled


def _parent_links(model: ModelRow) -> list[ParentLink]:
    return [ParentLink((e.details or {}).get("label") or e.parent.name or e.parent_id, e.parent_id, e.relation, e.role,
                       e.parent.kind == PLACEHOLDER) for e in model.parents]

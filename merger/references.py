"""Model references in recipes, resolved in a fixed order:

1. the name of an earlier stage of the same recipe;
2. a model in merger's store that the resolver's viewer may see, by id, unique id prefix, or name
   (external directories are not looked up by name: they are re-read, so a changed directory is seen as
   changed); see ``Store.find``;
3. a directory under one of the model roots (``MERGER_MODEL_ROOTS``); relative paths are tried against
   each root, and nothing may leave the roots (``..``, absolute paths and symlinks are checked after
   resolution); a path outside them is not found, whatever is there;
4. a Hugging Face id ``org/name`` (``@revision`` optional), taken from the local HF cache only.

A rebuild pins references: a pinned text resolves to the exact stored model it resolved to when the
model was built, whatever the names point to now.
"""

import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from merger.card import model_label
from merger.errors import MergerError
from merger.settings import Settings
from merger.store import Store

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# every "not found" says it, whether or not something exists outside the roots: the answer must not tell
OUTSIDE = "; nothing outside the model roots is read"


@dataclass(frozen=True)
class Source:
    kind: str  # "stage" | "store" | "local" | "hub"
    path: Path | None = None
    model_id: str | None = None
    stage: str | None = None
    hub_id: str | None = None
    label: str = ""  # how cards and adapter configs name it: its Hub id where it has one, else its name


@dataclass(frozen=True)
class Pin:
    """A reference fixed to the stored model it named when a model was built, and the label it had then."""

    model_id: str
    label: str


class UnresolvedReference(MergerError):
    """A reference that cannot be resolved; the message says why."""


class Resolver:
    def __init__(self, settings: Settings, store: Store, pins: dict[str, Pin] | None = None, viewer: str | None = None,
                 as_of: datetime | None = None):
        self.settings = settings
        self.store = store
        self.pins = pins or {}  # reference text ("name" or "name@revision") -> pinned model
        self.viewer = viewer  # the user whose models references may name (None: the whole store)
        self.as_of = as_of  # only models stored by then (None: now)

    def resolve(self, text: str, revision: str | None = None, *, stages: frozenset[str] = frozenset()) -> Source:
        pin = self.pins.get(f"{text}@{revision}" if revision else text)
        if pin is not None:
            model = self.store.get(pin.model_id)
            return Source("store", path=self.store.path_of(model), model_id=model.id, label=pin.label)
        if revision is None and text in stages:
            return Source("stage", stage=text, label=text)
        if revision is None:
            try:
                model = self.store.find(text, stored_only=True, viewer=self.viewer, as_of=self.as_of)
            except MergerError as exc:  # an ambiguous id prefix
                raise UnresolvedReference(str(exc)) from None
            if model is not None:
                return Source("store", path=self.store.path_of(model), model_id=model.id, label=model_label(model))
        return self.external(text, revision)

    def external(self, text: str, revision: str | None = None) -> Source:
        """A directory under the model roots or, with a revision or when there is none, a Hub id in the local cache."""
        local = self._under_roots(text) if revision is None else None
        if local is not None:
            return Source("local", path=local, label=local.name)
        if HUB_ID.match(text) and not Path(text).is_absolute():
            return Source("hub", path=self._from_hf_cache(text, revision), hub_id=f"{text}@{revision}" if revision else text, label=text)
        raise UnresolvedReference(self._not_found(text))

    def confine(self, text: str) -> Path:
        """A path that must lie under the model roots (tokenizer files, chat templates...)."""
        path = self._under_roots(text)
        if path is None:
            raise UnresolvedReference(self._not_found(text))
        return path

    def data_file(self, text: str, relative_to: Path | None = None) -> Path:
        """An evaluation data file under the model roots (``relative_to``: a directory to read ``text`` from)."""
        path = self._under_roots(str(relative_to / text) if relative_to else text)
        if path is None:
            raise UnresolvedReference(f"{text!r} is not a file under the model roots ({self._roots_text()}){OUTSIDE}")
        if not path.is_file():
            raise UnresolvedReference(f"{text!r} is a directory, not a data file")
        return path

    def _under_roots(self, text: str) -> Path | None:
        """The existing path ``text`` names under the model roots, else None: outside them nothing is looked at
        further, so no answer tells what exists there; a name the OS refuses (too long, a NUL...) is not found."""
        roots = self.settings.model_roots
        try:
            raw = Path(text).expanduser()
            candidates = [raw] if raw.is_absolute() else [root / raw for root in roots]
            for candidate in candidates:
                resolved = candidate.resolve()
                if any(resolved.is_relative_to(root) for root in roots) and resolved.exists():
                    return resolved
        except (OSError, ValueError, RuntimeError):  # ENAMETOOLONG, ELOOP, embedded NUL, lone surrogates, ~unknown-user
            pass
        return None

    def _from_hf_cache(self, repo_id: str, revision: str | None) -> Path:
        from huggingface_hub import snapshot_download

        try:
            path = snapshot_download(
                repo_id, revision=revision, local_files_only=True,
                cache_dir=str(self.settings.hf_cache_dir) if self.settings.hf_cache_dir else None,
            )
        except Exception:  # huggingface_hub raises several error types for "not cached"
            where = f"@{revision}" if revision else ""
            raise UnresolvedReference(
                f"{repo_id}{where} is not a stage, a stored model, or a directory under the model roots "
                f"({self._roots_text()}), and is not in the local Hugging Face cache (merger never downloads)"
            ) from None
        return Path(path)

    def _not_found(self, text: str) -> str:
        return f"{text!r} is not a stage, a stored model, or a directory under the model roots ({self._roots_text()}){OUTSIDE}"

    def _roots_text(self) -> str:
        return ", ".join(map(str, self.settings.model_roots)) or "none set: MERGER_MODEL_ROOTS"

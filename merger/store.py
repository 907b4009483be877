"""The artifact store: model directories named by content id, published atomically, with lineage rows.

Layout under ``MERGER_HOME``: ``models/<id>/`` (finished models), ``staging/<host>-<pid>-<n>/`` (work in
progress; a model becomes visible only by one rename into ``models/``), and the SQLite database.
"""

import os
import re
import shutil
import socket
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterator

from sqlalchemy import and_, select

from merger.access import as_seen_by
from merger.db import CacheRow, EdgeRow, EvaluationRow, FileRow, ModelRow, RunRow, add_unless_exists, make_sessionmaker
from merger.errors import MergerError
from merger.hash_cache import HashCache
from merger.hashing import FileEntry, manifest, manifest_id
from merger.settings import Settings

HEX = re.compile(r"^[0-9a-f]{6,64}$")
PLACEHOLDER = "placeholder"  # the kind of a parent known only by its label (no files); see merger.registry


@dataclass(frozen=True)
class Parent:
    model_id: str
    relation: str
    role: str
    weight: float | None = None
    details: dict | None = None


class Store:
    def __init__(self, settings: Settings):
        self.settings = settings
        settings.models_dir.mkdir(parents=True, exist_ok=True)
        settings.staging_dir.mkdir(parents=True, exist_ok=True)
        self.session = make_sessionmaker(settings.resolved_database_url)
        self.hashes = HashCache(self.session)
        self._remove_abandoned_staging()

    # --- files -----------------------------------------------------------------------------------------

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A private work directory on the store's filesystem; removed afterwards whatever happens."""
        path = self.settings.staging_dir / f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        path.mkdir()
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def path_of(self, model: ModelRow) -> Path:
        return Path(model.location) if model.location else self.settings.models_dir / model.id

    def _remove_abandoned_staging(self) -> None:
        """Staging dirs of dead processes on this host are leftovers of a crash."""
        host = socket.gethostname()
        for entry in self.settings.staging_dir.iterdir():
            parts = entry.name.rsplit("-", 2)
            if len(parts) == 3 and parts[0] == host and parts[1].isdigit() and not _pid_alive(int(parts[1])):
                shutil.rmtree(entry, ignore_errors=True)

    # --- publishing --------------------------------------------------------------------------------------

    def publish(
        self,
        staged: Path,
        *,
        name: str | None,
        kind: str = "model",
        architecture: str | None = None,
        parents: list[Parent] = (),
        recipe: dict | None = None,
        recipe_digest: str | None = None,
        versions: dict | None = None,
        origin: dict | None = None,
        digests: dict[str, str] | None = None,
    ) -> tuple[ModelRow, bool]:
        """Move a finished directory into the store under its content id and record it; True if this call stored it.

        Idempotent: bytes already stored keep their row as it is (name, lineage, and so who owns them). A row known
        before only as an external directory becomes the stored model. ``digests``: the sha256 of files (by
        relative path) their writer took as it wrote them; the others are hashed here.
        """
        entries = manifest(staged, known=digests)
        model_id = manifest_id(entries)
        dest = self.settings.models_dir / model_id
        try:
            os.rename(staged, dest)  # atomic: the model appears whole or not at all
        except OSError:
            if not dest.is_dir():
                raise
            shutil.rmtree(staged)  # the same bytes are already stored
        with self.session.begin() as s:
            created = add_unless_exists(s, self._new_row(model_id, entries, name=name, kind=kind, architecture=architecture))
            row = s.get(ModelRow, model_id)
            if created or row.location is not None:  # new, or known before only as an external directory
                row.location, row.name = None, name or row.name
                row.recipe, row.recipe_digest = recipe, recipe_digest
                row.versions, row.origin = versions, origin
                row.parents = [
                    EdgeRow(parent_id=p.model_id, relation=p.relation, role=p.role, weight=p.weight, position=i, details=p.details)
                    for i, p in enumerate(parents)
                ]
                created = True
        return self.get(model_id), created

    def register_directory(self, path: Path, *, name: str | None = None, kind: str = "model", architecture: str | None = None) -> ModelRow:
        """Record an external directory (left where it is) by content id, so lineage can point at it."""
        entries = manifest(path, self.hashes.sha256)
        model_id = manifest_id(entries)
        with self.session.begin() as s:
            row = self._new_row(model_id, entries, name=name or path.name, kind=kind, architecture=architecture)
            row.location = str(path)
            if not add_unless_exists(s, row):
                row = s.get(ModelRow, model_id)
                if row.location is not None and row.location != str(path) and not Path(row.location).is_dir():
                    row.location = str(path)  # the directory moved
        return self.get(model_id)

    @staticmethod
    def _new_row(model_id: str, entries: list[FileEntry], **fields) -> ModelRow:
        return ModelRow(
            id=model_id,
            size_bytes=sum(e.size for e in entries),
            files=[FileRow(path=e.path, size=e.size, sha256=e.sha256) for e in entries],
            **fields,
        )

    # --- cache and runs ---------------------------------------------------------------------------------

    def cached(self, key: str) -> ModelRow | None:
        with self.session() as s:
            hit = s.get(CacheRow, key)
            if hit is None:
                return None
            model = self.get(hit.model_id)
        return model if model and self.path_of(model).is_dir() else None

    def remember(self, key: str, model_id: str) -> None:
        with self.session.begin() as s:
            if not add_unless_exists(s, CacheRow(key=key, model_id=model_id)):
                s.get(CacheRow, key).model_id = model_id

    def record_run(self, *, stage: str, cache_key: str, model_id: str, cache_hit: bool, seconds: float) -> None:
        with self.session.begin() as s:
            s.add(RunRow(stage=stage, cache_key=cache_key, model_id=model_id, cache_hit=cache_hit, seconds=seconds))

    def runs(self, cache_key: str | None = None) -> list[RunRow]:
        with self.session() as s:
            query = select(RunRow).order_by(RunRow.id)
            if cache_key:
                query = query.where(RunRow.cache_key == cache_key)
            return list(s.scalars(query))

    # --- evaluations ------------------------------------------------------------------------------------------

    def evaluation(self, key: str) -> EvaluationRow | None:
        with self.session() as s:
            return s.get(EvaluationRow, key)

    def save_evaluation(self, row: EvaluationRow) -> None:
        """Insert, or replace a re-evaluation with the same key (``--force``)."""
        with self.session.begin() as s:
            if not add_unless_exists(s, row):
                s.merge(row)

    def evaluations(self, model_id: str) -> list[EvaluationRow]:
        with self.session() as s:
            query = select(EvaluationRow).where(EvaluationRow.model_id == model_id).order_by(EvaluationRow.created_at)
            return list(s.scalars(query))

    # --- queries ------------------------------------------------------------------------------------------

    def get(self, model_id: str) -> ModelRow | None:
        with self.session() as s:
            return s.get(ModelRow, model_id)

    def find(self, ref: str, *, stored_only: bool = False, viewer: str | None = None, as_of: datetime | None = None) -> ModelRow | None:
        """A model by full id, unique id prefix (6+ hex digits) or name, among those ``viewer`` may see.

        ``viewer`` is a user of the service (None: the whole store). A name means the viewer's own model of that
        name, else one granted to them, else a public one; the newest within each (see ``merger.access``). A
        model the viewer may not see is not found, exactly as one that does not exist, and does not make a
        prefix ambiguous. ``as_of``: only models stored by then. ``stored_only`` skips external directories, whose
        content may have changed since they were seen, and placeholders, which have no files.
        """
        if not _storable(ref):
            return None  # no row can hold it, and the database would refuse to compare it
        scope = and_(ModelRow.location.is_(None), ModelRow.kind != PLACEHOLDER) if stored_only else ModelRow.id.is_not(None)
        with self.session() as s:
            if HEX.match(ref):
                by_id = as_seen_by(select(ModelRow.id).where(scope, ModelRow.id.startswith(ref)), viewer, as_of)
                ids = list(s.scalars(by_id.limit(2)))
                if len(ids) > 1:
                    raise MergerError(f"{ref!r} is an ambiguous id prefix; give more digits")
                if ids:
                    return self.get(ids[0])
            by_name = as_seen_by(select(ModelRow.id).where(scope, ModelRow.name == ref), viewer, as_of)
            model_id = s.scalars(by_name.limit(1)).first()
        return self.get(model_id) if model_id else None

    def resolve(self, ref: str) -> ModelRow:
        model = self.find(ref)
        if model is None:
            raise MergerError(f"no model {ref!r} in the store (see `merger models`)")
        return model

    def list_models(self) -> list[ModelRow]:
        with self.session() as s:
            return list(s.scalars(select(ModelRow).order_by(ModelRow.created_at)))

    def export(self, model: ModelRow, dest: Path) -> Path:
        """Copy a model's files into ``dest`` (created; must not exist or be empty)."""
        if model.kind == PLACEHOLDER:
            raise MergerError(f"{model.name} is a placeholder (a parent named by a registered model's card): it has no files")
        if dest.exists() and any(dest.iterdir()):
            raise MergerError(f"{dest}: export directory is not empty")
        dest.mkdir(parents=True, exist_ok=True)
        source = self.path_of(model)
        for f in model.files:
            target = dest / f.path
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / f.path, target)
        return dest


def _storable(text: str) -> bool:
    """Text every database can store: no NUL (PostgreSQL refuses it) and no lone surrogate (not UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

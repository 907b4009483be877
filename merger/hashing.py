"""Content addressing: a model's id is the sha256 of its file manifest."""

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CHUNK = 1 << 20


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def manifest(directory: Path, sha256: Callable[[Path], str] = sha256_file) -> list[FileEntry]:
    """Every regular file under ``directory`` (hidden files and folders excluded), sorted by path; ``sha256``
    hashes one file (``merger.hash_cache.HashCache.sha256`` reuses earlier hashes of unchanged files)."""
    entries = []
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file() or path.is_symlink():
            continue
        entries.append(FileEntry(rel.as_posix(), path.stat().st_size, sha256(path)))
    return entries


def manifest_id(entries: list[FileEntry]) -> str:
    digest = hashlib.sha256()
    for entry in sorted(entries, key=lambda e: e.path):
        digest.update(f"{entry.path}\0{entry.size}\0{entry.sha256}\n".encode())
    return digest.hexdigest()


def digest_json(value: object) -> str:
    """sha256 of a JSON-serializable value in canonical form."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

"""Content addressing: a model's id is the sha256 of its file manifest."""

import hashlib
import json
import os
import threading
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


class PrefixDigest:
    """sha256 of a file of known size whose byte ranges become final in any order: a thread hashes the final
    prefix (read back from the page cache) while the rest is still being written, so that little is left to hash
    when the file is done. A range may be rewritten until it is declared final."""

    def __init__(self, path: Path, size: int):
        self._fd = os.open(path, os.O_RDONLY)
        self._size, self._final, self._hashed = size, 0, 0
        self._ranges: dict[int, int] = {}  # final ranges beyond the final prefix: start -> stop
        self._digest = hashlib.sha256()
        self._changed = threading.Condition()
        self._abandoned = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._hash, name="merger-digest", daemon=True)
        self._thread.start()

    def final(self, start: int, stop: int) -> None:
        """Bytes ``[start, stop)`` are written and will not change."""
        if stop <= start:
            return
        with self._changed:
            self._ranges[start] = stop
            while self._final in self._ranges:
                self._final = self._ranges.pop(self._final)
            self._changed.notify()

    def hexdigest(self) -> str:
        """The file's sha256, once every byte was declared final."""
        if self._final != self._size:
            self.abandon()
            raise ValueError(f"bytes {self._final} to {self._size} were never declared final")
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._digest.hexdigest()

    def abandon(self) -> None:
        with self._changed:
            self._abandoned = True
            self._changed.notify()
        self._thread.join()

    def _hash(self) -> None:
        buffer = memoryview(bytearray(CHUNK))  # reused: a fresh block per read would cost its page faults
        try:
            while self._hashed < self._size:
                with self._changed:
                    self._changed.wait_for(lambda: self._abandoned or self._final > self._hashed)
                    if self._abandoned:
                        return
                    stop = self._final
                while self._hashed < stop:
                    count = os.preadv(self._fd, [buffer[:min(CHUNK, stop - self._hashed)]], self._hashed)
                    if count == 0:
                        raise OSError(f"file ended at byte {self._hashed} of {self._size}")
                    self._digest.update(buffer[:count])
                    self._hashed += count
        except BaseException as exc:  # raised again by hexdigest
            self._error = exc
        finally:
            os.close(self._fd)


def manifest(directory: Path, sha256: Callable[[Path], str] = sha256_file, known: dict[str, str] | None = None) -> list[FileEntry]:
    """Every regular file under ``directory`` (hidden files and folders excluded), sorted by path; ``sha256``
    hashes one file (``merger.hash_cache.HashCache.sha256`` reuses earlier hashes of unchanged files, ``known``
    those taken while the files were written)."""
    entries = []
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file() or path.is_symlink():
            continue
        name = rel.as_posix()
        entries.append(FileEntry(name, path.stat().st_size, (known or {}).get(name) or sha256(path)))
    return entries


def manifest_id(entries: list[FileEntry]) -> str:
    digest = hashlib.sha256()
    for entry in sorted(entries, key=lambda e: e.path):
        digest.update(f"{entry.path}\0{entry.size}\0{entry.sha256}\n".encode())
    return digest.hexdigest()


def digest_json(value: object) -> str:
    """sha256 of a JSON-serializable value in canonical form."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

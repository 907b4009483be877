"""Serving checkpoints: single files with Range and a sha256 ETag, and whole models as a streamed tar.

A stored model's files are served from the store. A recipe's input directory (a model row with a ``location``
under the model roots) is not the store's: it may have changed since it was recorded. Each of its files is
opened first, then checked (the opened file lies under the model roots, its bytes have the recorded sha256),
then served from that same open file, so a file or symlink swapped at any moment is never served under the
recorded ETag: a changed file answers 409 instead. (Only bytes rewritten in place, in the same file, while
they are being sent could still get through; the store's own copies have no such window.)
"""

import hashlib
import os
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote

from fastapi import HTTPException
from fastapi.responses import FileResponse, StreamingResponse
from starlette.background import BackgroundTask

from merger.db import ModelRow
from merger.store import Store

BLOCK = 512
CHUNK = 1 << 20
# what a quoted filename="..." may hold as it is; anything else becomes "_" there (the exact name is in filename*)
NOT_PLAIN = re.compile(r'[^A-Za-z0-9 !#$&+,.:;=?@^_`{|}~()\[\]\'-]')


def file_response(store: Store, model: ModelRow, entry, headers: dict[str, str] | None = None) -> FileResponse:
    """``entry`` is a FileRow of ``model``; Starlette answers Range requests (206) and HEAD from the file itself."""
    headers = {"etag": f'"{entry.sha256}"', "x-sha256": entry.sha256, **(headers or {})}
    if model.location is None:
        return FileResponse(store.path_of(model) / entry.path, headers=headers, media_type="application/octet-stream")
    checked = open_recorded(store.path_of(model), entry, store.settings.model_roots)
    # the checked open file itself, through its descriptor: whatever the path names by now is not read
    return FileResponse(f"/dev/fd/{checked.fileno()}", stat_result=os.fstat(checked.fileno()), headers=headers,
                        media_type="application/octet-stream", background=BackgroundTask(checked.close))


def archive_response(store: Store, model: ModelRow) -> StreamingResponse:
    """A tar of the model's files (an input directory's are all checked before the first byte)."""
    name = model.name or model.id[:12]
    root = store.path_of(model)
    opened = _open_all(root, model.files, store.settings.model_roots) if model.location else None
    return StreamingResponse(
        _tar_stream(root, model, name, opened), media_type="application/x-tar",
        headers={"content-disposition": attachment(f"{name}.tar"), "x-model-id": model.id},
    )


def attachment(filename: str) -> str:
    """A Content-Disposition for any file name: an ASCII ``filename`` and the exact UTF-8 one (RFC 6266, 5987)."""
    plain = NOT_PLAIN.sub("_", filename)
    if plain == filename:
        return f'attachment; filename="{filename}"'
    return f"attachment; filename=\"{plain}\"; filename*=UTF-8''{quote(filename, safe='', errors='replace')}"


def open_recorded(root: Path, entry, roots: list[Path]) -> BinaryIO:
    """``root / entry.path`` opened, if the opened file lies under ``roots`` and holds the recorded sha256; else 409."""
    changed = HTTPException(409, f"{entry.path} of this input directory has changed since it was recorded "
                                 f"(sha256 {entry.sha256[:12]}); it is not served")
    try:
        fh = open(root / entry.path, "rb")
    except OSError:
        raise changed from None
    try:
        if not _lies_under(fh, root / entry.path, roots) or hashlib.file_digest(fh, "sha256").hexdigest() != entry.sha256:
            raise changed
        fh.seek(0)
    except BaseException:
        fh.close()
        raise
    return fh


def _open_all(root: Path, entries: list, roots: list[Path]) -> list[BinaryIO]:
    opened = []
    try:
        for entry in entries:
            opened.append(open_recorded(root, entry, roots))
    except BaseException:
        for fh in opened:
            fh.close()
        raise
    return opened


def _lies_under(fh: BinaryIO, path: Path, roots: list[Path]) -> bool:
    """The opened file is the one ``path`` resolves to now, and that lies under ``roots`` (a swap in between fails)."""
    try:
        real = path.resolve(strict=True)
        now, opened = os.stat(real), os.fstat(fh.fileno())
    except (OSError, RuntimeError):
        return False
    return (now.st_dev, now.st_ino) == (opened.st_dev, opened.st_ino) and any(real.is_relative_to(r) for r in roots)


def _tar_stream(root: Path, model: ModelRow, top: str, opened: list[BinaryIO] | None) -> Iterator[bytes]:
    """A tar of the model's files under ``top/``, produced file by file: nothing is built on disk."""
    try:
        for i, entry in enumerate(model.files):
            info = tarfile.TarInfo(f"{top}/{entry.path}")
            info.size, info.mode, info.mtime = entry.size, 0o644, 0
            yield info.tobuf(format=tarfile.PAX_FORMAT)
            with opened[i] if opened else open(root / entry.path, "rb") as fh:
                while chunk := fh.read(CHUNK):
                    yield chunk
            if entry.size % BLOCK:
                yield b"\0" * (BLOCK - entry.size % BLOCK)
        yield b"\0" * (BLOCK * 2)
    finally:
        for fh in opened or ():
            fh.close()

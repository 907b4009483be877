"""Serving checkpoints: single files with Range and a sha256 ETag, and whole models as a streamed tar."""

import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

from fastapi.responses import FileResponse, StreamingResponse

from merger.db import ModelRow

BLOCK = 512
CHUNK = 1 << 20
# what a quoted filename="..." may hold as it is; anything else becomes "_" there (the exact name is in filename*)
NOT_PLAIN = re.compile(r'[^A-Za-z0-9 !#$&+,.:;=?@^_`{|}~()\[\]\'-]')


def file_response(root: Path, entry, headers: dict[str, str] | None = None) -> FileResponse:
    """``entry`` is a FileRow; Starlette answers Range requests (206) and HEAD from the file itself."""
    return FileResponse(root / entry.path, headers={"etag": f'"{entry.sha256}"', "x-sha256": entry.sha256, **(headers or {})},
                        media_type="application/octet-stream")


def archive_response(root: Path, model: ModelRow) -> StreamingResponse:
    name = model.name or model.id[:12]
    return StreamingResponse(
        _tar_stream(root, model, name), media_type="application/x-tar",
        headers={"content-disposition": attachment(f"{name}.tar"), "x-model-id": model.id},
    )


def attachment(filename: str) -> str:
    """A Content-Disposition for any file name: an ASCII ``filename`` and the exact UTF-8 one (RFC 6266, 5987)."""
    plain = NOT_PLAIN.sub("_", filename)
    if plain == filename:
        return f'attachment; filename="{filename}"'
    return f"attachment; filename=\"{plain}\"; filename*=UTF-8''{quote(filename, safe='', errors='replace')}"


def _tar_stream(root: Path, model: ModelRow, top: str) -> Iterator[bytes]:
    """A tar of the model's files under ``top/``, produced file by file: nothing is built on disk."""
    for entry in model.files:
        info = tarfile.TarInfo(f"{top}/{entry.path}")
        info.size, info.mode, info.mtime = entry.size, 0o644, 0
        yield info.tobuf(format=tarfile.PAX_FORMAT)
        with open(root / entry.path, "rb") as fh:
            while chunk := fh.read(CHUNK):
                yield chunk
        if entry.size % BLOCK:
            yield b"\0" * (BLOCK - entry.size % BLOCK)
    yield b"\0" * (BLOCK * 2)

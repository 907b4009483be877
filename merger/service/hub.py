"""The subset of the Hugging Face Hub protocol that huggingface_hub and transformers use to download models.

With ``HF_ENDPOINT`` pointing at merger, ``hf download OWNER/NAME``, ``hf_hub_download``, ``snapshot_download``
and ``from_pretrained("OWNER/NAME")`` read stored models:

- The repository ``OWNER/NAME`` holds the models named NAME that user OWNER owns (a job of theirs stored them,
  or they registered them first) and the caller may see; the newest is the revision ``main``.
- A model's commit is the first 40 hex digits of its content id; ``main``, a commit or a full content id name
  a revision.
- Every file is an LFS file whose oid and ETag are its sha256. Files are served directly, not redirected.
- Errors carry the Hub's ``X-Error-Code``: RepoNotFound (401 without a token, else 404; a private model of
  someone else is not found), RevisionNotFound, EntryNotFound (with ``X-Repo-Commit``).
"""

import hashlib
import re
from datetime import datetime

from fastapi import APIRouter, HTTPException
from fastapi.responses import Response
from sqlalchemy import select

from merger.access import owned_by, visible_to
from merger.db import FileRow, ModelRow, as_utc
from merger.service.deps import OptionalUserDep, Service, ServiceDep
from merger.service.downloads import file_response
from merger.service.schemas import DetailOut, HubLfs, HubModelInfo, HubSibling, HubTreeEntry, file_responses

REVISION_ID = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")

# the Hub's errors: JSON {"detail": ...} with X-Error-Code and X-Error-Message headers
ERROR_HEADERS = {
    "X-Error-Code": {"description": "The Hub's error code", "schema": {"enum": ["RepoNotFound", "RevisionNotFound", "EntryNotFound"]}},
    "X-Error-Message": {"description": "The detail, as printable ASCII", "schema": {"type": "string", "pattern": "^[\\x20-\\x7e]*$"}},
}
HUB_ERRORS = {
    401: {"model": DetailOut, "headers": ERROR_HEADERS,
          "description": "RepoNotFound without a token (a token may help), or a token merger does not know"},
    404: {"model": DetailOut, "description": "RepoNotFound, RevisionNotFound or EntryNotFound; EntryNotFound carries X-Repo-Commit",
          "headers": {**ERROR_HEADERS, "X-Repo-Commit": {"description": "The revision's commit", "schema": {"type": "string"}}}},
}
router = APIRouter(tags=["Hugging Face Hub"], responses=HUB_ERRORS)


def _commit_of(model: ModelRow) -> str:
    return model.id[:40]


def _hub_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> HTTPException:
    return HTTPException(status, message, headers={"X-Error-Code": code, "X-Error-Message": header_safe(message), **(headers or {})})


def header_safe(text: str, limit: int = 1024) -> str:
    """``text`` as a header value may hold it: printable ASCII, with anything else (a name in any script, a newline
    from a %0a in the URL) as a Python escape; cut at ``limit`` characters (clients cap a response's headers)."""
    escaped = text.encode("unicode_escape").decode("ascii")
    return escaped if len(escaped) <= limit else escaped[: limit - 3] + "..."


def _model_at(svc: Service, user: str | None, owner: str, name: str, revision: str) -> ModelRow:
    """The model that ``revision`` of OWNER/NAME names, for this caller; else the Hub's not-found error."""
    repo = (select(ModelRow.id).where(ModelRow.name == name, owned_by(owner), visible_to(user))
            .order_by(ModelRow.created_at.desc()))
    with svc.store.session() as s:
        newest = s.scalars(repo.limit(1)).first()
        if newest is None:
            # as the Hub: without a token 401 (a token may help), else 404; neither tells that the repository exists
            raise _hub_error(401 if user is None else 404, "RepoNotFound", f"Repository {owner}/{name} not found")
        if revision == "main":
            model_id = newest
        elif REVISION_ID.fullmatch(revision):
            model_id = s.scalars(repo.where(ModelRow.id.startswith(revision)).limit(1)).first()
        else:
            model_id = None
    if model_id is None:
        raise _hub_error(404, "RevisionNotFound", f"Revision {revision} not found in {owner}/{name}")
    return svc.store.get(model_id)


def _hub_time(moment: datetime) -> str:
    """The one form huggingface_hub parses: UTC, milliseconds, a trailing Z."""
    return as_utc(moment).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _lfs_pointer(entry: FileRow) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{entry.sha256}\nsize {entry.size}\n".encode()


def _file_entry(entry: FileRow) -> HubTreeEntry:
    """As the Hub lists an LFS file: its oid is the git blob id of its pointer file."""
    pointer = _lfs_pointer(entry)
    blob_id = hashlib.sha1(b"blob %d\0" % len(pointer) + pointer).hexdigest()
    return HubTreeEntry(type="file", oid=blob_id, size=entry.size, path=entry.path,
                        lfs=HubLfs(oid=entry.sha256, size=entry.size, pointerSize=len(pointer)))


def _folder_entry(path: str, files: list[FileRow]) -> HubTreeEntry:
    """A folder's oid digests the files below it (the Hub's is a git tree id; clients only compare it)."""
    below = "".join(f"{f.path} {f.sha256}\n" for f in files if f.path.startswith(f"{path}/"))
    return HubTreeEntry(type="directory", oid=hashlib.sha1(below.encode()).hexdigest(), size=0, path=path)


def _tree(files: list[FileRow], folder: str, recursive: bool) -> list[HubTreeEntry]:
    """The folders and files directly in ``folder`` ("" = the top), or everything below it if ``recursive``."""
    prefix = f"{folder}/" if folder else ""
    folders: set[str] = set()
    listed = []
    for entry in files:
        if not entry.path.startswith(prefix):
            continue
        parts = entry.path[len(prefix):].split("/")
        deepest = len(parts) - 1 if recursive else min(len(parts) - 1, 1)
        folders.update(prefix + "/".join(parts[:depth]) for depth in range(1, deepest + 1))
        if recursive or len(parts) == 1:
            listed.append(_file_entry(entry))
    return [_folder_entry(path, files) for path in sorted(folders)] + listed


@router.get("/api/models/{owner}/{name}", response_model=HubModelInfo)
@router.get("/api/models/{owner}/{name}/revision/{revision}", response_model=HubModelInfo)
def model_info(owner: str, name: str, svc: ServiceDep, user: OptionalUserDep, revision: str = "main"):
    model = _model_at(svc, user, owner, name, revision)
    created = _hub_time(model.created_at)  # a revision never changes after it is stored
    return HubModelInfo(id=f"{owner}/{name}", author=owner, sha=_commit_of(model), private=not model.public,
                        createdAt=created, lastModified=created, siblings=[HubSibling(rfilename=f.path) for f in model.files])


@router.get("/api/models/{owner}/{name}/tree/{revision}", response_model=list[HubTreeEntry], response_model_exclude_none=True)
@router.get("/api/models/{owner}/{name}/tree/{revision}/{path:path}", response_model=list[HubTreeEntry],
            response_model_exclude_none=True)
def list_tree(owner: str, name: str, revision: str, svc: ServiceDep, user: OptionalUserDep, path: str = "",
              recursive: bool = False):
    model = _model_at(svc, user, owner, name, revision)
    folder = path.strip("/")
    if folder and not any(f.path.startswith(f"{folder}/") for f in model.files):
        raise _hub_error(404, "EntryNotFound", f"No folder {folder} in {owner}/{name}", {"X-Repo-Commit": _commit_of(model)})
    return _tree(model.files, folder, recursive)


@router.get("/{owner}/{name}/resolve/{revision}/{path:path}", response_class=Response, responses=file_responses())
@router.head("/{owner}/{name}/resolve/{revision}/{path:path}", response_class=Response, responses=file_responses())
def resolve(owner: str, name: str, revision: str, path: str, svc: ServiceDep, user: OptionalUserDep):
    """One file; HEAD gives the commit, ETag and size the client caches by; a Range GET answers 206."""
    model = _model_at(svc, user, owner, name, revision)
    commit = {"X-Repo-Commit": _commit_of(model)}
    entry = next((f for f in model.files if f.path == path), None)
    if entry is None:
        # the commit lets the client cache that the file does not exist in this revision
        raise _hub_error(404, "EntryNotFound", f"No file {path} in {owner}/{name}", commit)
    return file_response(svc.store, model, entry, {**commit, "X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)})

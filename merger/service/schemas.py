"""The API's request and response bodies."""

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field

from merger.db import EvaluationRow, JobRow, ModelRow, as_utc
from merger.service.limits import MAX_TARGET_BYTES

# a moment with its time zone (UTC), as the OpenAPI date-time format requires; SQLite hands back naive datetimes
UtcDatetime = Annotated[datetime, AfterValidator(as_utc)]


class RecipeIn(BaseModel):
    recipe: dict[str, Any] | str = Field(description="The recipe: a mapping, or YAML text")
    name: str = Field(default="recipe", description="Names a plain mergekit config's output (as a file stem would)")


class JobIn(RecipeIn):
    force: bool = Field(default=False, description="Recompute even when cached")
    gpu: bool = Field(default=False, description="Run on a GPU worker if one is alive (else on a CPU worker)")


class Problem(BaseModel):
    loc: str
    msg: str


class DetailOut(BaseModel):
    """An error: what was wrong, or what was not found."""

    detail: str


class FieldErrorOut(BaseModel):
    loc: list[str | int] = Field(description="Where in the request: path, query, header or body, then the field path")
    msg: str
    type: str


class RequestErrorOut(BaseModel):
    """A request that does not fit the route's parameters or body schema."""

    detail: list[FieldErrorOut]


# --- what each error status means, for the OpenAPI document --------------------------------------------------

TEXT = {"schema": {"type": "string"}}
BINARY = {"schema": {"type": "string", "format": "binary"}}
ERRORS = {
    400: "A malformed request (a NUL in the URL, a body that is not UTF-8 or not parseable), or an error merger reports",
    401: "No valid API token",
    403: "Only an owner of the model may do this",
    404: "No such job or model among those you may see",
    409: "A file of an input directory has changed since it was recorded: it is not served",
    413: "The request body is over MERGER_MAX_BODY_BYTES",
    414: f"The request target (path and query) is over {MAX_TARGET_BYTES} bytes",
    422: "The request does not fit the schema, or its JSON body nests too deep or holds NaN, Infinity or a lone surrogate",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for error statuses: a JSON ``{"detail": ...}`` each (422: a list of field errors, or one)."""
    return {status: {"model": RequestErrorOut | DetailOut if status == 422 else DetailOut, "description": ERRORS[status]}
            for status in statuses}


def file_responses() -> dict[int | str, dict[str, Any]]:
    """A single file served with Range support (Starlette answers malformed and unsatisfiable ranges in plain text)."""
    return {200: {"description": "The file", "content": {"application/octet-stream": BINARY}},
            206: {"description": "The requested range of the file", "content": {"application/octet-stream": BINARY}},
            400: {**errors(400)[400], "content": {"text/plain": TEXT}},
            416: {"description": "The Range is outside the file", "content": {"text/plain": TEXT}},
            **errors(409)}


class ValidationOut(BaseModel):
    ok: bool
    stages: list[str] = []
    problems: list[Problem] = []


class ErrorOut(BaseModel):
    code: str
    message: str


class JobOut(BaseModel):
    id: str
    owner: str
    state: str
    recipe_name: str
    queue: str
    created_at: UtcDatetime
    started_at: UtcDatetime | None
    finished_at: UtcDatetime | None
    stage: str | None
    done: int
    total: int
    model_id: str | None
    error: ErrorOut | None
    attempts: int

    @classmethod
    def of(cls, job: JobRow) -> "JobOut":
        error = ErrorOut(code=job.error_code, message=job.error_message or "") if job.error_code else None
        fields = {name: getattr(job, name) for name in cls.model_fields if name != "error"}
        return cls(**fields, error=error)


class FileOut(BaseModel):
    path: str
    size: int
    sha256: str


class ParentOut(BaseModel):
    id: str
    name: str | None
    kind: str = Field(description="model | adapter | placeholder (a parent known only by its label, not registered yet) | "
                                  "hidden (a model you may not see: its id only)")
    relation: str
    role: str
    weight: float | None


class ModelOut(BaseModel):
    id: str
    name: str | None
    kind: str
    architecture: str | None
    size_bytes: int
    public: bool
    created_at: UtcDatetime
    files: list[FileOut]
    parents: list[ParentOut]
    recipe_digest: str | None = Field(description="sha256 of the stage recipe that produced it (none for registered models)")
    origin: dict[str, Any] | None = Field(description="Where a registered or imported model came from (hub_id, revision, commit, source)")

    @classmethod
    def of(cls, model: ModelRow) -> "ModelOut":
        return cls(
            id=model.id, name=model.name, kind=model.kind, architecture=model.architecture, size_bytes=model.size_bytes,
            public=bool(model.public), created_at=model.created_at,
            files=[FileOut(path=f.path, size=f.size, sha256=f.sha256) for f in model.files],
            parents=[ParentOut(id=e.parent_id, name=e.parent.name, kind=e.parent.kind, relation=e.relation, role=e.role, weight=e.weight)
                     for e in model.parents],
            recipe_digest=model.recipe_digest, origin=model.origin,
        )


class RegisterIn(BaseModel):
    source: str = Field(description="A directory under the server's model roots, or org/name[@revision] in its local Hugging Face cache")
    name: str = Field(min_length=1, max_length=200, description="Its name in the store (its Hub id is a good one)")
    parents: list[str] | None = Field(default=None, description="Hub ids, store ids or names; default: the card's base_model, else an adapter's base")
    relation: Literal["adapter", "merge", "quantized", "finetune"] | None = Field(
        default=None, description="Default: the card's base_model_relation, else inferred as the Hub does")


class LineageNodeOut(BaseModel):
    id: str
    name: str | None = None
    kind: str | None = None
    hub_id: str | None = None
    recipe_digest: str | None = None
    inputs: list[str] = Field(default=[], description="Every input id of the model, in recipe order")
    hidden: bool = Field(default=False, description="A model you may not see: only its id is shown")


class LineageEdgeOut(BaseModel):
    child: str
    parent: str = Field(description="The exact content id the child was made from")
    relation: str
    role: str
    weight: float | None
    position: int
    recipe_digest: str | None = Field(description="The child's stage recipe digest")
    ref: str | None = Field(description="The reference as the recipe wrote it (for a registered model: the parent's label)")
    loc: str | None = Field(description="Where the recipe wrote it")


class LineageOut(BaseModel):
    root: str
    direction: Literal["ancestors", "descendants"]
    to: str | None
    nodes: list[LineageNodeOut]
    edges: list[LineageEdgeOut]


class VisibilityIn(BaseModel):
    public: bool


class EvaluationOut(BaseModel):
    """One stored measurement of a model (``merger eval`` or an evaluate stage)."""

    dataset: str = Field(description="The data file as it was given")
    dataset_sha256: str
    metric: str = Field(description="perplexity | task_accuracy | multiple_choice | lm_eval | kl_divergence (a quantized model against its unquantized source, on a perplexity text)")
    value: float = Field(description="The headline number: perplexity, accuracy, the lm-eval task's first metric, or the KL divergence")
    values: dict[str, Any]
    runtime: str
    limit: int | None
    settings: dict[str, Any]
    tokens_per_second: float | None
    seconds: float
    versions: dict[str, str]
    created_at: UtcDatetime

    @classmethod
    def of(cls, row: EvaluationRow) -> "EvaluationOut":
        from merger.evaluation.table import headline

        return cls(dataset=row.dataset, dataset_sha256=row.dataset_sha256, metric=row.metric, value=headline(row),
                   values=row.values, runtime=row.runtime, limit=row.limit, settings=row.settings,
                   tokens_per_second=row.tokens_per_second, seconds=row.seconds, versions=row.versions,
                   created_at=row.created_at)


# --- the Hugging Face Hub protocol subset (field names are the Hub's) ---------------------------------------


class HubSibling(BaseModel):
    rfilename: str


class HubModelInfo(BaseModel):
    id: str = Field(description="OWNER/NAME")
    author: str
    sha: str = Field(description="The revision's commit: the first 40 hex digits of the model's content id")
    private: bool
    gated: bool = False
    disabled: bool = False
    createdAt: str = Field(description="UTC, milliseconds, a trailing Z: the one form huggingface_hub parses")
    lastModified: str
    siblings: list[HubSibling]


class HubLfs(BaseModel):
    oid: str = Field(description="The file's sha256")
    size: int
    pointerSize: int


class HubTreeEntry(BaseModel):
    type: str = Field(description="file | directory")
    oid: str
    size: int
    path: str
    lfs: HubLfs | None = None

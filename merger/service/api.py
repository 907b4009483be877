"""The HTTP API, versioned under /v1. OpenAPI at /docs and /openapi.json."""

import asyncio
import importlib
import json
import logging
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from sse_starlette.sse import EventSourceResponse

from merger import __version__, graph
from merger.access import can_see, grant
from merger.errors import MergerError, Problem, RecipeError
from merger.orchestrator import check_recipe
from merger.registry import register
from merger.safe_yaml import load_recipe_text
from merger.search.picture import record_svg
from merger.service import lookups
from merger.service.deps import Service, ServiceDep, UserDep
from merger.service.downloads import archive_response, file_response
from merger.service.hub import router as hub_router
from merger.service.jobs import FINAL, Jobs
from merger.service.limits import RequestLimits
from merger.service.lookups import model_out, own_job, visible_model
from merger.service.schemas import (
    BINARY,
    TEXT,
    DetailOut,
    EvaluationOut,
    JobIn,
    JobOut,
    LineageOut,
    ModelOut,
    RecipeIn,
    RegisterIn,
    RequestErrorOut,
    ValidationOut,
    VisibilityIn,
    errors,
    file_responses,
)
from merger.service.web import routes as web
from merger.settings import Settings
from merger.store import Store

LOG = logging.getLogger(__name__)
EVENT_POLL = 0.25
# a recipe's problems (ValidationOut), besides the request's own (RequestErrorOut, DetailOut)
RECIPE_ERRORS = {**errors(401), 422: {"model": ValidationOut | RequestErrorOut | DetailOut, "description": "The recipe's problems, each with "
                                      "its field path; or the request's own (see the other routes)"}}
# server-sent events, each a `job` event whose data is the job as JSON (OpenAPI 3.2's itemSchema, as FastAPI's own SSE)
JOB_EVENTS = {"description": "A `job` event at once and on every change, until the job ends", "content": {"text/event-stream": {
    "itemSchema": {"type": "object", "required": ["event", "data"], "properties": {
        "event": {"const": "job"},
        "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": {"$ref": "#/components/schemas/JobOut"}}}}}}}
LINEAGE_MEDIA_TYPES = {"mermaid": "text/plain; charset=utf-8", "dot": "text/vnd.graphviz; charset=utf-8"}


def create_app(settings: Settings) -> FastAPI:
    from merger.service.queue import enqueue, live_queues

    store = Store(settings)
    svc = Service(settings, store, Jobs(settings, store, enqueue, live_queues=live_queues))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # a server checks a merge by a method merger's engine does not run with mergekit's method registry: import
        # it (seconds) at start, not in the first such request (the CLI imports it only for such a merge)
        await asyncio.to_thread(importlib.import_module, "mergekit.merge_methods.registry")
        reaper = asyncio.create_task(_reap_forever(svc))
        yield
        reaper.cancel()

    # every route may answer these: the limits refuse before routing, FastAPI checks parameters and bodies
    app = FastAPI(title="merger", version=__version__, lifespan=lifespan, responses=errors(400, 413, 414, 422))
    app.add_middleware(RequestLimits, max_body_bytes=settings.max_body_bytes)
    app.state.service = svc
    _routes(app)
    web.mount(app)  # the pages at /
    app.include_router(hub_router)  # after /v1 and the pages: its /{owner}/{name}/resolve/... paths are the broadest
    return app


async def _reap_forever(svc: Service) -> None:
    while True:
        await asyncio.sleep(svc.settings.reaper_interval)
        try:
            await asyncio.to_thread(svc.jobs.reap)
        except Exception:  # noqa: BLE001 - keep reaping; the next round may succeed
            LOG.exception("reaper round failed")


def _recipe_data(body: RecipeIn, settings: Settings) -> Any:
    if isinstance(body.recipe, str):
        return load_recipe_text(body.recipe, source="recipe", max_bytes=settings.max_recipe_bytes)
    size = len(json.dumps(body.recipe))
    if size > settings.max_recipe_bytes:
        raise RecipeError([Problem("recipe", f"recipe is {size} bytes, over the {settings.max_recipe_bytes}-byte limit")])
    return body.recipe


def _field_error(error: dict[str, Any]) -> dict[str, Any]:
    reason = (error.get("ctx") or {}).get("error")
    msg = f"{error['msg']}: {reason}" if isinstance(reason, str) else error["msg"]
    return {"loc": list(error["loc"]), "msg": msg, "type": error["type"]}


def _problems_response(exc: RecipeError) -> JSONResponse:
    body = ValidationOut(ok=False, problems=[{"loc": p.loc, "msg": p.msg} for p in exc.problems])
    return JSONResponse(body.model_dump(), status_code=422)


def _routes(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def request_error(_request: Request, exc: RequestValidationError):
        """FastAPI's 422 without the echo of the input (which may be bytes that are not UTF-8)."""
        return JSONResponse({"detail": [_field_error(e) for e in exc.errors()]}, status_code=422)

    @app.exception_handler(RecipeError)
    async def recipe_error(_request: Request, exc: RecipeError):
        return _problems_response(exc)

    @app.exception_handler(MergerError)
    async def merger_error(_request: Request, exc: MergerError):
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.post("/v1/recipes/validate", response_model=ValidationOut, responses=RECIPE_ERRORS)
    def validate(body: RecipeIn, svc: ServiceDep, user: UserDep):
        recipe = check_recipe(_recipe_data(body, svc.settings), svc.settings, svc.store, default_name=body.name, viewer=user)
        return ValidationOut(ok=True, stages=recipe.stage_names())

    @app.post("/v1/jobs", response_model=JobOut, status_code=202,
              responses={200: {"model": JobOut, "description": "cache hit"}, **RECIPE_ERRORS})
    def submit(body: JobIn, svc: ServiceDep, user: UserDep):
        job = svc.jobs.submit(user, _recipe_data(body, svc.settings), name=body.name, force=body.force, gpu=body.gpu)
        out = JobOut.of(job)
        return out if job.state != "succeeded" else JSONResponse(out.model_dump(mode="json"), status_code=200)

    @app.get("/v1/jobs", response_model=list[JobOut], responses=errors(401))
    def list_jobs(svc: ServiceDep, user: UserDep):
        return [JobOut.of(j) for j in svc.jobs.owned_by(user)]

    @app.get("/v1/jobs/{job_id}", response_model=JobOut, responses=errors(401, 404))
    def get_job(job_id: str, svc: ServiceDep, user: UserDep):
        return JobOut.of(own_job(svc, job_id, user))

    @app.post("/v1/jobs/{job_id}/cancel", response_model=JobOut, responses=errors(401, 404))
    def cancel_job(job_id: str, svc: ServiceDep, user: UserDep):
        own_job(svc, job_id, user)
        return JobOut.of(svc.jobs.cancel(job_id))

    @app.get("/v1/jobs/{job_id}/events", response_class=Response,
             responses={200: JOB_EVENTS, **errors(401, 404)})
    async def job_events(job_id: str, svc: ServiceDep, user: UserDep):
        """Server-sent events: one `job` event per change of state, stage or progress, until the job ends."""
        own_job(svc, job_id, user)

        async def stream():
            last = None
            while True:
                job = JobOut.of(await asyncio.to_thread(svc.jobs.get, job_id))
                snapshot = (job.state, job.stage, job.done, job.total)
                if snapshot != last:
                    last = snapshot
                    yield {"event": "job", "data": job.model_dump_json()}
                if job.state in FINAL:
                    return
                await asyncio.sleep(EVENT_POLL)

        return EventSourceResponse(stream())

    @app.get("/v1/models", response_model=list[ModelOut], responses=errors(401))
    def list_models(svc: ServiceDep, user: UserDep):
        return lookups.visible_models(svc, user)

    @app.get("/v1/models/{model_id}", response_model=ModelOut, responses=errors(401, 404))
    def get_model(model_id: str, svc: ServiceDep, user: UserDep):
        return model_out(svc, visible_model(svc, model_id, user), user)

    @app.post("/v1/models/{model_id}/visibility", response_model=ModelOut, responses=errors(401, 403, 404))
    def set_visibility(model_id: str, body: VisibilityIn, svc: ServiceDep, user: UserDep):
        """Only an owner (a user whose job stored the model, or who registered it first) may publish or unpublish it."""
        model = lookups.set_visibility(svc, model_id, user, body.public)
        return model_out(svc, model, user)

    @app.post("/v1/models", response_model=ModelOut, status_code=201,
              responses={200: {"model": ModelOut, "description": "the same bytes were in the store already"}, **errors(401)})
    def register_model(body: RegisterIn, svc: ServiceDep, user: UserDep):
        """Copy a model or adapter from the server's model roots or Hugging Face cache into the store, with its
        parents (looked up among the models the caller may see); runs in the request. The caller owns it and sees
        the placeholders it created; bytes already stored are left as they are and the caller may read them."""
        done = register(svc.settings, svc.store, body.source, name=body.name, parents=body.parents, relation=body.relation,
                        viewer=user)
        with svc.store.session.begin() as s:
            grant(s, [done.model.id], user, owner=done.created)
            if done.created:
                grant(s, [p.model_id for p in done.parents if p.placeholder], user)
        out = model_out(svc, svc.store.get(done.model.id), user)
        return out if done.created else JSONResponse(out.model_dump(mode="json"), status_code=200)

    @app.get("/v1/models/{model_id}/lineage", response_model=LineageOut,
             responses={200: {"content": {"text/plain": TEXT, "text/vnd.graphviz": TEXT}, "description": "json, mermaid or dot"},
                        **errors(401, 404)})
    def get_lineage(model_id: str, svc: ServiceDep, user: UserDep,
                    direction: Literal["ancestors", "descendants"] | None = None,
                    to: Annotated[str | None, Query(description="Another model: the lineage path between the two")] = None,
                    fmt: Annotated[Literal["json", "mermaid", "dot"], Query(alias="format")] = "json"):
        """Ancestors (default), descendants, or the path to another model. Models you may not see: see docs/lineage.md."""
        if direction and to:
            raise HTTPException(422, "give direction or to, not both")
        model = visible_model(svc, model_id, user)
        with svc.store.session() as s:
            try:
                if to:
                    found = graph.between(svc.store, model.id, visible_model(svc, to, user).id)
                else:
                    found = (graph.descendants if direction == "descendants" else graph.ancestors)(svc.store, model.id)
                found = graph.visible_part(found, lambda i: can_see(s, i, user))
            except (graph.NoPath, graph.NotVisible):
                raise HTTPException(404, f"no lineage path you may see between {model_id} and {to}") from None
        if fmt == "json":
            return LineageOut.model_validate(graph.to_json(found))
        return PlainTextResponse(graph.render(found, fmt), media_type=LINEAGE_MEDIA_TYPES[fmt])

    @app.get("/v1/models/{model_id}/evals", response_model=list[EvaluationOut], responses=errors(401, 404))
    def get_evaluations(model_id: str, svc: ServiceDep, user: UserDep):
        """Every stored evaluation of the model, oldest first."""
        model = visible_model(svc, model_id, user)
        return [EvaluationOut.of(row) for row in svc.store.evaluations(model.id)]

    @app.get("/v1/models/{model_id}/search", response_model=dict[str, Any], responses=errors(401, 404))
    def get_search(model_id: str, svc: ServiceDep, user: UserDep):
        """The record of the search that made the model (docs/recipes.md#search); 404 for a model no search made."""
        return lookups.search_record(visible_model(svc, model_id, user), model_id)

    @app.get("/v1/models/{model_id}/search.svg", response_class=Response,
             responses={200: {"description": "The picture of the search: objective and each task's accuracy over its steps",
                              "content": {"image/svg+xml": TEXT}}, **errors(401, 404)})
    def get_search_picture(model_id: str, svc: ServiceDep, user: UserDep):
        model = visible_model(svc, model_id, user)
        svg = record_svg(lookups.search_record(model, model_id), f"{model.name or model.id[:12]}: {model.id[:12]}")
        return Response(svg, media_type="image/svg+xml")

    @app.get("/v1/models/{model_id}/files/{path:path}", response_class=Response, responses={**file_responses(), **errors(401, 404)})
    @app.head("/v1/models/{model_id}/files/{path:path}", response_class=Response, responses={**file_responses(), **errors(401, 404)})
    def get_file(model_id: str, path: str, svc: ServiceDep, user: UserDep):
        model = visible_model(svc, model_id, user)
        entry = next((f for f in model.files if f.path == path), None)
        if entry is None:
            raise HTTPException(404, f"model {model_id} has no file {path}")
        return file_response(svc.store, model, entry)

    @app.get("/v1/models/{model_id}/archive", response_class=Response,
             responses={200: {"description": "A tar of the model's files under NAME/", "content": {"application/x-tar": BINARY}},
                        **errors(401, 404, 409)})
    def get_archive(model_id: str, svc: ServiceDep, user: UserDep):
        model = visible_model(svc, model_id, user)
        return archive_response(svc.store, model)

"""The web pages at `/`: server-rendered Jinja templates (htmx and a little JavaScript); the API under /v1 does the work.

Every page needs a signed-in user (single-user mode: always `local`); a form that changes something must come from
this server's own pages (its Origin header).
"""

from pathlib import Path
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, FastAPI, Form, HTTPException, Request
from fastapi.responses import PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel

from merger.errors import RecipeError
from merger.formatting import human_size
from merger.orchestrator import check_recipe
from merger.recipe import parse_recipe
from merger.safe_yaml import load_recipe_text
from merger.service.auth import user_for_token
from merger.service.deps import Service, ServiceDep, current_user
from merger.service.jobs import FINAL
from merger.service.lookups import model_out, own_job, set_visibility, visible_model, visible_models
from merger.service.schemas import JobOut, ModelOut
from merger.service.session import forget_token, keep_token, require_same_origin
from merger.service.web import views
from merger.service.web.problem_lines import problem_lines

HERE = Path(__file__).parent
EXAMPLES = HERE.parents[2] / "recipes"  # the shipped recipes, in a checkout or an editable install
TEMPLATES = Jinja2Templates(directory=HERE / "templates")
TEMPLATES.env.filters["size"] = human_size
# the page loads nothing from elsewhere and runs only its own scripts (CodeMirror and the graphs set inline styles)
CSP = ("default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
       "form-action 'self'; frame-ancestors 'none'")

class SignInRequired(Exception):
    pass


class PageError(Exception):
    def __init__(self, status: int, message: str):
        self.status, self.message = status, message


def errors_as_pages():
    """A page's 403 or 404 as a page, not the API's JSON."""
    try:
        yield
    except HTTPException as exc:
        raise PageError(exc.status_code, str(exc.detail)) from None


router = APIRouter(include_in_schema=False, dependencies=[Depends(errors_as_pages)])


def page_user(request: Request, svc: ServiceDep) -> str:
    try:
        return current_user(request, svc)
    except HTTPException as exc:
        if exc.status_code == 401:
            raise SignInRequired from None
        raise


PageUser = Annotated[str, Depends(page_user)]


def mount(app: FastAPI) -> None:
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.include_router(router)

    @app.exception_handler(SignInRequired)
    async def sign_in_first(request: Request, _exc: SignInRequired):
        return RedirectResponse(f"/signin?next={quote(request.url.path)}", status_code=303)

    @app.exception_handler(PageError)
    async def error_page(request: Request, exc: PageError):
        return page(request, "error.html", None, status_code=exc.status, status=exc.status, message=exc.message)


def page(request: Request, template: str, user: str | None, status_code: int = 200, **context) -> Response:
    svc = request.app.state.service
    response = TEMPLATES.TemplateResponse(request, template, {"user": user, "single_user": svc.settings.single_user, **context},
                                          status_code=status_code)
    response.headers["content-security-policy"] = CSP
    return response


def newest_first(svc: Service, user: str) -> list[ModelOut]:
    return visible_models(svc, user)[::-1]


def _safe_next(target: str) -> str:
    """Only a path on this server (no scheme, no `//host`)."""
    return target if target.startswith("/") and not target.startswith("//") and "\\" not in target else "/"


# --- signing in ---------------------------------------------------------------------------------------------------


@router.get("/")
def home():
    return RedirectResponse("/models", status_code=303)


@router.get("/signin")
def sign_in_form(request: Request, svc: ServiceDep, next: str = "/"):
    if svc.settings.single_user:
        return RedirectResponse(_safe_next(next), status_code=303)
    return page(request, "signin.html", None, next=_safe_next(next))


@router.post("/signin")
def sign_in(request: Request, svc: ServiceDep, token: Annotated[str, Form()], next: Annotated[str, Form()] = "/"):
    require_same_origin(request)
    with svc.store.session() as s:
        user = user_for_token(s, token.strip())
    if user is None:
        return page(request, "signin.html", None, status_code=401, next=_safe_next(next), error="That token is not valid.")
    response = RedirectResponse(_safe_next(next), status_code=303)
    keep_token(response, request, token.strip())
    return response


@router.post("/signout")
def sign_out(request: Request):
    require_same_origin(request)
    response = RedirectResponse("/signin", status_code=303)
    forget_token(response)
    return response


# --- models -------------------------------------------------------------------------------------------------------


@router.get("/models")
def models_page(request: Request, svc: ServiceDep, user: PageUser, relation: str = "", name: str = ""):
    rows = [(m, views.relation_of(m)) for m in newest_first(svc, user)]
    shown = [(m, r) for m, r in rows if (not relation or r == relation) and name.lower() in (m.name or "").lower()]
    return page(request, "models.html", user, models=shown, relations=views.RELATIONS, relation=relation, name=name,
                total=len(rows))


@router.get("/models/{model_id}")
def model_page(request: Request, model_id: str, svc: ServiceDep, user: PageUser):
    row = visible_model(svc, model_id, user)
    model = model_out(svc, row, user)
    front, card = views.card_html(svc, row)
    return page(request, "model.html", user, model=model, relation=views.relation_of(model), card_front=front, card=card,
                recipe=views.recipe_yaml(row), repo=views.hub_repo(svc, row, user), owner=views.user_owns(svc, row.id, user),
                server=str(request.base_url).rstrip("/"), scores=views.score_table(svc, views.evaluation_subjects(svc, model, user)),
                history=views.search_history(row))


@router.post("/models/{model_id}/visibility")
def toggle_visibility(request: Request, model_id: str, svc: ServiceDep, user: PageUser, public: Annotated[bool, Form()]):
    require_same_origin(request)
    row = set_visibility(svc, model_id, user, public)
    return RedirectResponse(f"/models/{row.id}", status_code=303)


@router.get("/models/{model_id}/lineage")
def lineage_page(request: Request, model_id: str, svc: ServiceDep, user: PageUser):
    model = model_out(svc, visible_model(svc, model_id, user), user)
    return page(request, "lineage.html", user, model=model)


@router.get("/compare")
def compare_page(request: Request, svc: ServiceDep, user: PageUser, a: str = "", b: str = ""):
    choices = newest_first(svc, user)
    context = {"selected": {"a": a, "b": b}}
    if a and b:
        rows = [visible_model(svc, a, user), visible_model(svc, b, user)]
        pair = [model_out(svc, r, user) for r in rows]
        context["selected"] = {"a": rows[0].id, "b": rows[1].id}
        names = tuple(f"{m.name or 'unnamed'} ({m.id[:12]})" for m in pair)
        context |= {"pair": pair, "scores": views.score_table(svc, [(pair[0], "a"), (pair[1], "b")]),
                   "diff": views.recipe_diff(views.recipe_yaml(rows[0]), views.recipe_yaml(rows[1]), names),
                   "common": views.common_ancestors(svc, rows[0].id, rows[1].id, user)}
    return page(request, "compare.html", user, choices=choices, **context)


# --- recipes and jobs ---------------------------------------------------------------------------------------------


def _examples() -> list[str]:
    return sorted(p.stem for p in EXAMPLES.glob("*.yaml")) if EXAMPLES.is_dir() else []


@router.get("/editor")
def editor_page(request: Request, svc: ServiceDep, user: PageUser, example: str = "", model: str = ""):
    """The editor; ``example``: a shipped recipe, ``model``: the recipe that made a model (else the saved draft)."""
    text = ""
    if model:
        text = views.new_recipe_yaml(visible_model(svc, model, user))
    elif example in _examples():
        text = (EXAMPLES / f"{example}.yaml").read_text(encoding="utf-8")
    return page(request, "editor.html", user, examples=_examples(), example=example, text=text)


@router.get("/editor/examples/{name}", response_class=PlainTextResponse)
def example(name: str, _user: PageUser):
    if name not in _examples():
        raise HTTPException(404, f"no example recipe {name}")
    return PlainTextResponse((EXAMPLES / f"{name}.yaml").read_text(encoding="utf-8"))


class CheckIn(BaseModel):
    recipe: str
    name: str = "recipe"


@router.post("/editor/check")
def check(request: Request, body: CheckIn, svc: ServiceDep, user: PageUser):
    """Every problem of the recipe text, each with its field path and line."""
    require_same_origin(request)
    try:
        data = load_recipe_text(body.recipe, source="recipe", max_bytes=svc.settings.max_recipe_bytes)
        recipe = check_recipe(data, svc.settings, svc.store, default_name=body.name, viewer=user)
    except RecipeError as exc:
        lines = problem_lines(body.recipe, [p.loc for p in exc.problems])
        return {"ok": False, "problems": [{"loc": p.loc, "msg": p.msg, "line": line} for p, line in zip(exc.problems, lines, strict=True)]}
    return {"ok": True, "stages": recipe.stage_names(), "problems": []}


@router.get("/jobs")
def jobs_page(request: Request, svc: ServiceDep, user: PageUser):
    return page(request, "jobs.html", user, jobs=[JobOut.of(j) for j in svc.jobs.owned_by(user)], final=FINAL)


@router.get("/jobs/{job_id}")
def job_page(request: Request, job_id: str, svc: ServiceDep, user: PageUser):
    row = own_job(svc, job_id, user)
    return page(request, "job.html", user, job=JobOut.of(row), stages=_stage_names(row.recipe, row.recipe_name),
                final=FINAL)


def _stage_names(recipe: dict, name: str) -> list[str]:
    try:
        return parse_recipe(recipe, default_name=name).stage_names()
    except RecipeError:  # a recipe from an older version: its stages show as they run
        return []

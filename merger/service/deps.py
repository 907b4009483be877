"""Request dependencies: the service's singletons and the calling user."""

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from merger.access import adopt_store
from merger.service.auth import SINGLE_USER, ensure_user, user_for_token
from merger.service.jobs import Jobs
from merger.service.session import cookie_token
from merger.settings import Settings
from merger.store import Store

# the Hugging Face Hub's words for a token it does not know (huggingface_hub then reports a bad token, not a missing repo)
INVALID_TOKEN = "Invalid credentials in Authorization header"


@dataclass
class Service:
    settings: Settings
    store: Store
    jobs: Jobs


def service(request: Request) -> Service:
    return request.app.state.service


def _single_user(svc: Service) -> str:
    """The one user of a single-user server, who owns every model in the store (adopted on each request)."""
    with svc.store.session.begin() as s:
        ensure_user(s, SINGLE_USER)
        adopt_store(s, SINGLE_USER)
    return SINGLE_USER


def _request_token(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer`` header, else that of the web pages' sign-in cookie."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else cookie_token(request)


def _token_user(svc: Service, token: str) -> str | None:
    with svc.store.session() as s:
        return user_for_token(s, token)


def current_user(request: Request, svc: Annotated[Service, Depends(service)]) -> str:
    if svc.settings.single_user:
        return _single_user(svc)
    token = _request_token(request)
    user = _token_user(svc, token) if token else None
    if user is None:
        raise HTTPException(401, "a valid API token is required (Authorization: Bearer <token>)", headers={"WWW-Authenticate": "Bearer"})
    return user


def optional_user(request: Request, svc: Annotated[Service, Depends(service)]) -> str | None:
    """The calling user, or None for a request without a token (it may read public models); an unknown token is refused."""
    if svc.settings.single_user:
        return _single_user(svc)
    token = _request_token(request)
    if token is None:
        return None
    user = _token_user(svc, token)
    if user is None:
        raise HTTPException(401, INVALID_TOKEN, headers={"WWW-Authenticate": "Bearer", "X-Error-Message": INVALID_TOKEN})
    return user


ServiceDep = Annotated[Service, Depends(service)]
UserDep = Annotated[str, Depends(current_user)]
OptionalUserDep = Annotated[str | None, Depends(optional_user)]

"""Request dependencies: the service's singletons and the calling user."""

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from merger.service.auth import SINGLE_USER, ensure_user, user_for_token
from merger.service.jobs import Jobs
from merger.settings import Settings
from merger.store import Store


@dataclass
class Service:
    settings: Settings
    store: Store
    jobs: Jobs


def service(request: Request) -> Service:
    return request.app.state.service


def current_user(request: Request, svc: Annotated[Service, Depends(service)]) -> str:
    if svc.settings.single_user:
        with svc.store.session.begin() as s:
            ensure_user(s, SINGLE_USER)
        return SINGLE_USER
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    user = None
    if scheme.lower() == "bearer" and token:
        with svc.store.session() as s:
            user = user_for_token(s, token.strip())
    if user is None:
        raise HTTPException(401, "a valid API token is required (Authorization: Bearer <token>)", headers={"WWW-Authenticate": "Bearer"})
    return user


ServiceDep = Annotated[Service, Depends(service)]
UserDep = Annotated[str, Depends(current_user)]

"""Signing in on the web pages: the API token kept in an HTTP-only, SameSite=Strict cookie.

A request that changes something and is authenticated by that cookie must come from this server's own pages: its
``Origin`` header (which browsers send with every such request and pages cannot forge) must name this host.
"""

from urllib.parse import urlsplit

from fastapi import HTTPException, Request, Response

COOKIE = "merger_token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def same_origin(request: Request) -> bool:
    origin = request.headers.get("origin")
    return origin is not None and urlsplit(origin).netloc == request.headers.get("host")


def require_same_origin(request: Request) -> None:
    if not same_origin(request):
        raise HTTPException(403, "refused: a request signed in by cookie must come from this server's pages (Origin)")


def cookie_token(request: Request) -> str | None:
    """The signed-in token, if any; refuses a state-changing request from another site."""
    token = request.cookies.get(COOKIE)
    if token and request.method not in SAFE_METHODS:
        require_same_origin(request)
    return token or None


def keep_token(response: Response, request: Request, token: str) -> None:
    response.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=request.url.scheme == "https", path="/")


def forget_token(response: Response) -> None:
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")

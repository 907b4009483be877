"""Limits the API enforces before a request reaches a route, so that no hostile request costs memory or ends in a
server error: the body's size (counted as it streams in, with or without Content-Length), the request target's
length, NUL characters in the URL, and a JSON body's encoding, nesting depth and Unicode."""

import json
import math
import re

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from merger.safe_yaml import DEPTH_MESSAGE, MAX_DEPTH, nesting_depth

# the longest request target (path and query) accepted; a stored file's path is at most PATH_MAX (4096 bytes)
MAX_TARGET_BYTES = 16 * 1024
# a \u escape of a UTF-16 surrogate, which JSON allows and Python decodes to a lone surrogate unless paired
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class RequestLimits:
    """Pure ASGI middleware: reads the body into memory only up to ``max_body_bytes`` (413 beyond), then hands it on."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        refusal = _target_refusal(scope) or self._declared_size_refusal(headers)
        if refusal:
            await refusal(scope, receive, send)
            return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                await self._too_large()(scope, receive, send)
                return
        refusal = _json_refusal(headers, bytes(body))
        if refusal:
            await refusal(scope, receive, send)
            return
        await self.app(scope, _replay(bytes(body), receive), send)

    def _too_large(self) -> JSONResponse:
        return _refuse(413, f"the request body is over the {self.max_body_bytes}-byte limit (MERGER_MAX_BODY_BYTES)")

    def _declared_size_refusal(self, headers: Headers) -> JSONResponse | None:
        declared = headers.get("content-length", "")
        return self._too_large() if declared.isdigit() and int(declared) > self.max_body_bytes else None


def _refuse(status: int, detail: str) -> JSONResponse:
    # the client may still be sending a body we will not read: close the connection after answering
    return JSONResponse({"detail": detail}, status_code=status, headers={"connection": "close"})


def _target_refusal(scope: Scope) -> JSONResponse | None:
    if len(scope.get("raw_path") or b"") + len(scope.get("query_string", b"")) > MAX_TARGET_BYTES:
        return _refuse(414, f"the request target is over the {MAX_TARGET_BYTES}-byte limit")
    if "\0" in scope["path"] or b"%00" in scope.get("query_string", b""):
        return _refuse(400, "the URL holds a NUL character")
    return None


def _is_json(headers: Headers) -> bool:
    """As FastAPI decides whether to parse a body as JSON: application/json or application/*+json."""
    media_type = headers.get("content-type", "").partition(";")[0].strip().lower()
    return media_type == "application/json" or (media_type.startswith("application/") and media_type.endswith("+json"))


def _json_refusal(headers: Headers, body: bytes) -> JSONResponse | None:
    """Refuses a JSON body that is not UTF-8, nests deeper than MAX_DEPTH, or holds NaN, Infinity or a lone surrogate
    (each would make a route's answer fail); a body that is not JSON is left to the route (422 with the position)."""
    if not body or not _is_json(headers):
        return None
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _refuse(400, f"the request body is not UTF-8 (byte {body[exc.start]:#04x} at offset {exc.start})")
    try:
        data = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except _Constant as exc:
        return _refuse(422, f"the JSON body holds {exc}")
    except RecursionError:
        return _refuse(422, f"the JSON body {DEPTH_MESSAGE}")
    except ValueError:
        return None
    if nesting_depth(data) > MAX_DEPTH:
        return _refuse(422, f"the JSON body {DEPTH_MESSAGE}")
    if SURROGATE_ESCAPE.search(text) and not _encodes(data):
        return _refuse(422, "the JSON body holds a lone surrogate (a \\ud800-\\udfff escape not in a pair): not Unicode text")
    return None


class _Constant(ValueError):
    """NaN, Infinity or -Infinity: Python's json reads them, JSON has no such values, and no response can echo them."""


def _no_constant(name: str):
    raise _Constant(f"{name}, which is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Constant(f"a number beyond the range of a float ({text[:20]}{'...' if len(text) > 20 else ''})")
    return value


def _encodes(data) -> bool:
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body already read, as one message; then the connection's own messages (a disconnect)."""
    delivered = False

    async def replayed():
        nonlocal delivered
        if delivered:
            return await receive()
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed

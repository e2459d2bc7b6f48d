"""Bounds on what one HTTP request can cost: a request body limit, and validation errors of bounded size.

:class:`RequestBodyLimit` refuses a body over the limit with 413 while it is being read, so an oversized
body is never in memory: a ``Content-Length`` over the limit is refused before the application runs, and a
chunked body is counted as its chunks arrive. :func:`validation_error_response` replaces FastAPI's 422
handler, which echoes the whole input of each error (a 50 MB string came back as a 52 MB response) and fails
with a 500 on an unpaired surrogate; ours echoes a short prefix, always encodable.
"""

from __future__ import annotations

import itertools
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "MAX_ECHOED_CHARACTERS",
    "MAX_ECHOED_ERRORS",
    "MAX_ECHOED_ITEMS",
    "BodyTooLarge",
    "RequestBodyLimit",
    "bounded",
    "validation_error_response",
]

#: Longest string a validation error echoes (longer ones are cut and end with "...").
MAX_ECHOED_CHARACTERS = 64
#: Most items of a list or keys of an object a validation error echoes, at most three levels deep.
MAX_ECHOED_ITEMS = 10
_MAX_ECHOED_DEPTH = 3
#: Most errors one 422 lists.
MAX_ECHOED_ERRORS = 20
_ELLIPSIS = "..."


class BodyTooLarge(HTTPException):
    """The request body is over the limit: 413, with the limit in the detail."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"Request body larger than {limit} bytes")


class RequestBodyLimit:
    """ASGI middleware: refuse HTTP request bodies larger than ``max_body_size`` bytes with 413.

    A declared ``Content-Length`` over the limit is refused before the application sees the request (so a
    route that does not read its body, a ``DELETE``, cannot act and then be refused). Otherwise ``receive``
    counts the bytes as they arrive and raises :class:`BodyTooLarge` at the first chunk past the limit:
    FastAPI turns it into the 413 response, and if the application swallowed it, this middleware sends the
    413 itself. The connection stays open: uvicorn reads the rest of the body and drops it without keeping it
    (closing instead would reset the connection under a client still sending, which then never reads the
    413). WebSocket and lifespan scopes pass through.
    """

    def __init__(self, app: ASGIApp, max_body_size: int) -> None:
        if max_body_size < 0:
            raise ValueError(f"max_body_size must be at least 0, not {max_body_size}")
        self.app = app
        self.max_body_size = max_body_size

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_size:
            await self._refuse(scope, receive, send)
            return
        received = 0
        exceeded = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_size:
                    exceeded = True
                    raise BodyTooLarge(self.max_body_size)
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                if exceeded and message["status"] != 413:
                    # The application caught the error and answered something else (a 400): not ours.
                    raise BodyTooLarge(self.max_body_size)
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except BodyTooLarge:
            if started:
                raise
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = BodyTooLarge(self.max_body_size)
        response = JSONResponse({"detail": error.detail}, status_code=413, headers=error.headers)
        await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server refuses a malformed Content-Length itself
    return None


# -- validation errors --------------------------------------------------------------------------------


def _text(value: str, limit: int = MAX_ECHOED_CHARACTERS) -> str:
    if len(value) > limit:
        value = value[:limit] + _ELLIPSIS
    # An unpaired surrogate cannot be encoded as UTF-8: show it as its escape, e.g. "\ud800".
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def bounded(value: Any, depth: int = 0) -> Any:
    """Return a JSON-encodable preview of ``value`` no larger than a few kilobytes.

    Strings are cut to :data:`MAX_ECHOED_CHARACTERS` (plus ``"..."``), lists and objects to their first
    :data:`MAX_ECHOED_ITEMS` items, three levels deep; unpaired surrogates become ``\\udXXX`` escapes.
    """
    if value is None or isinstance(value, bool | float):
        return value
    if isinstance(value, int):
        # Python parses integers of up to 4300 digits.
        return value if abs(value) < 2**64 else _text(str(value))
    if isinstance(value, str):
        return _text(value)
    if depth >= _MAX_ECHOED_DEPTH:
        return _ELLIPSIS
    if isinstance(value, dict):
        return {
            _text(str(key)): bounded(item, depth + 1)
            for key, item in itertools.islice(value.items(), MAX_ECHOED_ITEMS)
        }
    if isinstance(value, list | tuple):
        return [bounded(item, depth + 1) for item in itertools.islice(value, MAX_ECHOED_ITEMS)]
    return _text(str(value))


def _bounded_error(error: dict[str, Any]) -> dict[str, Any]:
    shown: dict[str, Any] = {
        "type": _text(str(error.get("type", ""))),
        # A location holds field names and list indexes; an unknown key sent by the client is one too.
        "loc": [part if isinstance(part, int) else _text(str(part)) for part in error.get("loc", ())],
        "msg": _text(str(error.get("msg", "")), 4 * MAX_ECHOED_CHARACTERS),
    }
    if "input" in error:
        shown["input"] = bounded(error["input"])
    if isinstance(error.get("ctx"), dict):
        shown["ctx"] = {_text(str(key)): bounded(item) for key, item in error["ctx"].items()}
    return shown


async def validation_error_response(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422 body (``{"detail": [{"type", "loc", "msg", "input", "ctx"}]}``), bounded in size.

    Lists at most :data:`MAX_ECHOED_ERRORS` errors, each input shown by :func:`bounded`.
    """
    assert isinstance(exc, RequestValidationError)
    errors = [_bounded_error(error) for error in itertools.islice(exc.errors(), MAX_ECHOED_ERRORS)]
    return JSONResponse({"detail": errors}, status_code=422)

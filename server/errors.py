"""The one error shape and the handlers that produce it.

Every error body is `{"error": str, "category": "user"|"server"}` (the shape of a failed future, §3.2), always
non-empty: the SDK takes a 400 with an empty body for a proxy hiccup and retries it (§1.5). Status codes follow
§1.6 and tinker_jax.errors: `UserError` (the client's mistake) is a 400, which the client does not retry, and
`NotFound` a 404 (unknown, or another key's: the same answer); `Overloaded` is a 429 with Retry-After, which it
retries with backoff (resending the same seq_id); `LimitReached` a 429 with Retry-After when it frees up by itself,
else a 400; `Unavailable` a 503 with its message (the server cannot work now, e.g. a lost process); anything
else, a plain ValueError included, is a bug here: logged with its traceback, answered 500
(retried for 5 minutes) with the exception's type only.
Tracebacks and exception texts go to the server log only, and no message carries the server's data directory
(`redact`).
"""

from __future__ import annotations

import logging
import math
import sqlite3
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from server.limits import LimitReached
from tinker_jax.errors import NotFound, Overloaded, Unavailable, UserError

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An HTTP error with a message meant for the client (e.g. 404 unknown session, 410 session finished)."""

    def __init__(self, status: int, message: str, category: str = "user", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.category, self.headers = status, message, category, headers


def error_body(message: str, category: str = "user") -> dict[str, str]:
    return {"error": message, "category": category}


def redact(message: str, private_paths: tuple[str, ...]) -> str:
    """`message` with every private path (the data directory, as given and resolved) replaced by `<data-dir>`."""
    for path in sorted(private_paths, key=len, reverse=True):
        if path and path != "/":
            message = message.replace(path, "<data-dir>")
    return message


def private_paths(data_dir: Any) -> tuple[str, ...]:
    from pathlib import Path

    return tuple(dict.fromkeys([str(data_dir), str(Path(data_dir).expanduser().resolve())]))


def install_error_handlers(app: FastAPI) -> None:
    def respond(request: Request, message: str, status: int, category: str = "user", **kw: Any) -> JSONResponse:
        settings = getattr(request.app.state, "settings", None)
        if settings is not None:
            message = redact(message, private_paths(settings.data_dir))
        return JSONResponse(error_body(message, category), status_code=status, **kw)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return respond(request, exc.message, exc.status, exc.category, headers=exc.headers)

    @app.exception_handler(UserError)  # malformed input; the message names the field. NotFound: an unknown id.
    async def _user_error(request: Request, exc: UserError) -> JSONResponse:
        return respond(request, str(exc) or type(exc).__name__, 404 if isinstance(exc, NotFound) else 400)

    @app.exception_handler(LimitReached)  # nothing was written
    async def _limit(request: Request, exc: LimitReached) -> JSONResponse:
        if exc.retry_after_s is None:
            return respond(request, exc.message, 400)
        return respond(request, exc.message, 429, headers={"Retry-After": str(max(1, min(60, math.ceil(
            exc.retry_after_s))))})

    @app.exception_handler(Overloaded)  # nothing was queued: the SDK backs off and resubmits the same seq_id
    async def _overloaded(request: Request, exc: Overloaded) -> JSONResponse:
        # Whole seconds, at least 1 (the SDK honours Retry-After between 0 and 60 s, §1.5).
        retry_after = str(max(1, math.ceil(exc.retry_after_s)))
        return respond(request, str(exc) or "overloaded; retry shortly", 429, "server",
                       headers={"Retry-After": retry_after})

    @app.exception_handler(Unavailable)  # the server cannot work now, and says why (e.g. a lost process)
    async def _unavailable(request: Request, exc: Unavailable) -> JSONResponse:
        log.error("%s %s refused: %s", request.method, request.url.path, exc)
        return respond(request, str(exc), 503, "server")

    @app.exception_handler(RequestValidationError)  # query/path parameters; 400 rather than FastAPI's 422
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        msg = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return respond(request, msg or "invalid request", 400)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        health = getattr(request.app.state, "health", None)
        if isinstance(exc, sqlite3.DatabaseError) and health is not None:
            health.store_suspect = True  # /healthz runs a full check of the database next time
        return JSONResponse(error_body(f"internal server error ({type(exc).__name__}); see the server log",
                                       "server"), status_code=500)

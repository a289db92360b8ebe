"""The one error shape and the handlers that produce it.

Every error body is `{"error": str, "category": "user"|"server"}` (the shape of a failed future, §3.2), always
non-empty: the SDK takes a 400 with an empty body for a proxy hiccup and retries it (§1.5). Status codes follow
§1.6 and tinker_jax.errors: `UserError` (the client's mistake) is a 400, which the client does not retry;
`Overloaded` is a 429 with Retry-After, which it retries with backoff (resending the same seq_id); anything else,
a plain ValueError included, is a bug here: logged with its traceback, answered 500 (retried for 5 minutes).
Tracebacks go to the server log only.
"""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from tinker_jax.errors import Overloaded, UserError

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An HTTP error with a message meant for the client (e.g. 404 unknown session, 410 session finished)."""

    def __init__(self, status: int, message: str, category: str = "user"):
        super().__init__(message)
        self.status, self.message, self.category = status, message, category


def error_body(message: str, category: str = "user") -> dict[str, str]:
    return {"error": message, "category": category}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.category), status_code=exc.status)

    @app.exception_handler(UserError)  # malformed input; the message names the field
    async def _user_error(request: Request, exc: UserError) -> JSONResponse:
        return JSONResponse(error_body(str(exc) or type(exc).__name__), status_code=400)

    @app.exception_handler(Overloaded)  # nothing was queued: the SDK backs off and resubmits the same seq_id
    async def _overloaded(request: Request, exc: Overloaded) -> JSONResponse:
        # Whole seconds, at least 1 (the SDK honours Retry-After between 0 and 60 s, §1.5).
        retry_after = str(max(1, math.ceil(exc.retry_after_s)))
        return JSONResponse(error_body(str(exc) or "overloaded; retry shortly", "server"), status_code=429,
                            headers={"Retry-After": retry_after})

    @app.exception_handler(RequestValidationError)  # query/path parameters; 400 rather than FastAPI's 422
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        msg = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return JSONResponse(error_body(msg or "invalid request"), status_code=400)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(f"internal server error ({type(exc).__name__})", "server"), status_code=500)

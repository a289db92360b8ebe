"""The one error shape and the handlers that produce it.

Every error body is `{"error": str, "category": "user"|"server"}` (the shape of a failed future, §3.2), always
non-empty: the SDK takes a 400 with an empty body for a proxy hiccup and retries it (§1.5). Status codes follow
§1.6: 400/401/404/410/415 are not retried by the client; 500 is (for 5 minutes), so it is kept for real bugs.
Tracebacks go to the server log only.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

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

    @app.exception_handler(ValueError)  # malformed input; wire decoders name the field in the message
    async def _value_error(request: Request, exc: ValueError) -> JSONResponse:
        return JSONResponse(error_body(str(exc) or type(exc).__name__), status_code=400)

    @app.exception_handler(RequestValidationError)  # query/path parameters; 400 rather than FastAPI's 422
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        msg = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return JSONResponse(error_body(msg or "invalid request"), status_code=400)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(f"internal server error ({type(exc).__name__})", "server"), status_code=500)

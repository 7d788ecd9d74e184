"""Every error leaves the gateway in the OpenAI envelope, with the right status."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from common.errors import CorralError, InvalidRequest

log = logging.getLogger(__name__)

_HTTP_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}


def _reply(err: CorralError) -> JSONResponse:
    return JSONResponse(err.envelope(), status_code=err.status, headers=err.headers())


def describe_validation(exc: RequestValidationError) -> InvalidRequest:
    """One readable message naming the first offending field (OpenAI's `param`)."""
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return InvalidRequest("The request body is not valid JSON.", code="invalid_json")
    param = ".".join(loc) or None
    msg = str(first.get("msg", "Invalid request body.")).removeprefix("Value error, ")
    where = f" at '{param}'" if param else ""
    return InvalidRequest(f"Invalid request body{where}: {msg}.", param=param)


def install(app: FastAPI) -> None:
    @app.exception_handler(CorralError)
    async def corral_error(request: Request, exc: CorralError) -> JSONResponse:
        return _reply(exc)

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _reply(describe_validation(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        err = CorralError(str(exc.detail), status=exc.status_code)
        body = err.envelope()
        body["error"]["type"] = _HTTP_TYPES.get(exc.status_code, "invalid_request_error")
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request=%s unexpected error", getattr(request.state, "request_id", "-"))
        return _reply(CorralError("Internal error in the gateway."))

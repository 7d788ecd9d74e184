"""Every error leaves the gateway in the OpenAI envelope, with the right status: one writer
of error replies (`error_response`, and `send_error` for code below the app: middlewares,
a stream's first reply) and the app's exception handlers, which use it."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import Send

from common.errors import CorralError, InvalidRequest, NoCapacity
from common.wire import first_problem

log = logging.getLogger(__name__)

_HTTP_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}

# The broker away (restarting, a network cut): a request can be retried, here or elsewhere.
REDIS_AWAY = NoCapacity(
    "The gateway cannot reach Redis right now; retry.", code="redis_unavailable", retry_after=2
)


def error_response(
    err: CorralError, headers: Mapping[str, str] | None = None, type_: str | None = None
) -> JSONResponse:
    """`err` as a reply: its envelope, its status, its headers (`Retry-After`) and `headers`."""
    body = err.envelope()
    if type_ is not None:
        body["error"]["type"] = type_
    return JSONResponse(body, status_code=err.status, headers={**err.headers(), **(headers or {})})


async def send_error(
    send: Send, err: CorralError, headers: Mapping[str, str] | None = None
) -> None:
    """Reply with `err` from below the app (a middleware, or a stream before its first
    byte), where no exception handler runs."""
    reply = error_response(err, headers)
    await send(
        {"type": "http.response.start", "status": reply.status_code, "headers": reply.raw_headers}
    )
    await send({"type": "http.response.body", "body": reply.body, "more_body": False})


def describe_validation(exc: RequestValidationError) -> InvalidRequest:
    """One readable message naming the first offending field (OpenAI's `param`)."""
    errors = exc.errors()
    if errors and errors[0].get("type") == "json_invalid":
        return InvalidRequest("The request body is not valid JSON.", code="invalid_json")
    param, msg = first_problem(errors, skip=("body",))
    where = f" at '{param}'" if param else ""
    return InvalidRequest(f"Invalid request body{where}: {msg}.", param=param)


def install(app: FastAPI) -> None:
    @app.exception_handler(CorralError)
    async def corral_error(request: Request, exc: CorralError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(describe_validation(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        err = CorralError(str(exc.detail), status=exc.status_code)
        kind = _HTTP_TYPES.get(exc.status_code, "invalid_request_error")
        return error_response(err, exc.headers, type_=kind)

    @app.exception_handler(RedisError)
    async def redis_away(request: Request, exc: RedisError) -> JSONResponse:
        log.warning("request=%s Redis unavailable: %r", _request_id(request), exc)
        return error_response(REDIS_AWAY)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request=%s unexpected error", _request_id(request))
        return error_response(CorralError("Internal error in the gateway."))


def _request_id(request: Request) -> str:
    return str(getattr(request.state, "request_id", "-"))

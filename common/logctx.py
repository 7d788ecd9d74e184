"""The request a log line belongs to, carried in a context variable.

The gateway binds it for the life of each HTTP request (its middleware) and a worker for
the life of each task (a Celery signal), and the log formatters in `corral.logs` add it to
every line, so `grep req_…` finds a request's whole story in the gateway's and the worker's
logs. A client's own `X-Request-ID`, if it sent a sane one, rides along as `client_request`
(never as our id: that one names the Celery task and must be unique).
"""

from __future__ import annotations

import logging
import re
from contextvars import ContextVar, Token

request_id: ContextVar[str | None] = ContextVar("corral_request_id", default=None)
client_request_id: ContextVar[str | None] = ContextVar("corral_client_request_id", default=None)

_SANE = re.compile(r"^[A-Za-z0-9._:/=+-]{1,128}$")


def sane_client_id(value: str | None) -> str | None:
    """A client-sent request id fit for a log line (no spaces, newlines or novels)."""
    return value if value is not None and _SANE.match(value) else None


Bound = tuple[Token[str | None], Token[str | None]]


def bind(rid: str | None, client_rid: str | None = None) -> Bound:
    return request_id.set(rid), client_request_id.set(client_rid)


def unbind(tokens: Bound) -> None:
    request_id.reset(tokens[0])
    client_request_id.reset(tokens[1])


class ContextFilter(logging.Filter):
    """Put the current request ids on every record (empty strings outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get() or ""
        record.client_request_id = client_request_id.get() or ""
        return True

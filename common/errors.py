"""The one exception hierarchy, and the OpenAI error envelope it turns into on the wire.

    CorralError                      500 server_error
    ├── InvalidRequest               400 invalid_request_error
    ├── AuthenticationFailed         401 authentication_error
    ├── PermissionDenied             403 permission_error
    ├── NotFound                     404 invalid_request_error
    │   ├── ModelNotFound                / model_not_found
    │   ├── FileNotFound                 / file_not_found
    │   ├── BatchNotFound                / batch_not_found
    │   └── RequestNotFound              / request_not_found
    ├── RequestTimeout               408 invalid_request_error / request_timeout
    ├── PayloadTooLarge              413 invalid_request_error
    ├── RateLimited                  429 rate_limit_error (+ Retry-After)
    │   └── QueueFull                429 rate_limit_error / queue_full
    ├── Cancelled                    499 server_error / cancelled
    ├── UpstreamError                llama-server's status (default 502) / upstream_error
    ├── WorkerLost                   502 server_error / worker_lost
    ├── StreamBroken                 502 server_error / stream_broken
    ├── NoCapacity                   503 server_error / no_capacity
    └── Timeout                      504 timeout_error

    Faults inside a worker, never sent to a client as they are:
    LlamaServerError                 the engine child would not start, or died
    ModelBroken                      a model no worker could load (its file, its size)
    QueueError                       the Celery consumer did not take the wanted queues
    GPUUnavailable                   NVML is absent, or the GPU is not there

Every error leaves the gateway as `{"error": {"message", "type", "param", "code"}}`, never a
bare string (llama-swap's `httperror.go`), and the same shape rides inside pub/sub error
frames, so a worker's error reaches the client unchanged.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from pydantic import BaseModel


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorEnvelope(BaseModel):
    error: ErrorBody


class CorralError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.retry_after = retry_after
        if status is not None:
            self.status = status  # type: ignore[misc]

    def body(self) -> ErrorBody:
        return ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code)

    def envelope(self) -> dict[str, Any]:
        return {"error": self.body().model_dump()}

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


class InvalidRequest(CorralError):
    status = 400
    type = "invalid_request_error"


class AuthenticationFailed(CorralError):
    status = 401
    type = "authentication_error"
    default_code = "invalid_api_key"


class PermissionDenied(CorralError):
    status = 403
    type = "permission_error"


class NotFound(CorralError):
    status = 404
    type = "invalid_request_error"


class ModelNotFound(NotFound):
    default_code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(
            f"The model {model!r} does not exist or is not served by this cluster.",
            param="model",
        )


class FileNotFound(NotFound):
    default_code = "file_not_found"


class BatchNotFound(NotFound):
    default_code = "batch_not_found"


class RequestNotFound(NotFound):
    default_code = "request_not_found"


class RequestTimeout(CorralError):
    status = 408
    type = "invalid_request_error"
    default_code = "request_timeout"


class PayloadTooLarge(CorralError):
    status = 413
    type = "invalid_request_error"
    default_code = "payload_too_large"


class RateLimited(CorralError):
    status = 429
    type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class QueueFull(RateLimited):
    default_code = "queue_full"


class Cancelled(CorralError):
    """The request was cancelled (`POST /v1/requests/{id}/cancel`), while it ran."""

    status = 499  # nginx's "client closed request"
    default_code = "cancelled"

    def __init__(self, message: str = "The request was cancelled.") -> None:
        super().__init__(message)


class UpstreamError(CorralError):
    status = 502
    type = "upstream_error"
    default_code = "upstream_error"


class WorkerLost(CorralError):
    status = 502
    default_code = "worker_lost"


class StreamBroken(CorralError):
    status = 502
    default_code = "stream_broken"


class NoCapacity(CorralError):
    status = 503
    default_code = "no_capacity"


class Timeout(CorralError):
    status = 504
    type = "timeout_error"
    default_code = "timeout"


class LlamaServerError(RuntimeError):
    """The engine child (llama-server, or a model's own engine) could not be started, or
    exited before it was ready; or its command cannot be filled in."""


class ModelBroken(RuntimeError):
    """A model that cannot be loaded (its file is missing, not a GGUF, too big for every
    device). `public` says why without paths or log lines, fit for API clients; the
    exception's message has the whole story, for the log and the admin API."""

    def __init__(self, public: str, detail: str | None = None) -> None:
        super().__init__(detail or public)
        self.public = public


class QueueError(RuntimeError):
    """The consumer did not reach the wanted set of queues."""


class GPUUnavailable(RuntimeError):
    """NVML is not available, or the GPU asked for does not exist."""


_BY_STATUS: dict[int, type[CorralError]] = {
    400: InvalidRequest,
    401: AuthenticationFailed,
    403: PermissionDenied,
    413: PayloadTooLarge,
    429: RateLimited,
    503: NoCapacity,
    504: Timeout,
}


def from_body(body: ErrorBody, status: int) -> CorralError:
    """Rebuild an error that crossed a process boundary (an error frame, a result file)."""
    if body.code == WorkerLost.default_code:
        return WorkerLost(body.message, param=body.param)  # the gateway may resubmit it
    cls = _BY_STATUS.get(status, UpstreamError if status >= 500 else InvalidRequest)
    err = cls(body.message, param=body.param, code=body.code, status=status)
    return err

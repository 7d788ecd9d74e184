"""May this generation request run, and at which priority: the checks of step 1 that need
both the caller's key and the model's config.

- the key may use the model (`corral keys create --models`), else 403;
- `max_tokens` fits the model's context, else 400 (llama-server would accept it and then
  run until the context is full);
- the priority asked for is within the key's maximum; above it the request runs at the
  cap (`priority_over_cap: downgrade`, the reply's `X-Request-Priority` says so) or is
  refused with 403 (`reject`).

It also labels the request (model, priority) for the metrics middleware, and refuses a
request over its key's rate limits (429) that the edge let through until its model was
known (`gateway.edge.auth`).
"""

from __future__ import annotations

import logging

from fastapi import Request

from common.errors import CorralError, InvalidRequest, PermissionDenied
from common.priority import Priority
from common.settings import ModelConfig, Settings
from common.wire import WireModel
from gateway.tenancy.principals import principal_of

log = logging.getLogger(__name__)


def admit(
    request: Request,
    settings: Settings,
    alias: str,
    model: ModelConfig,
    body: WireModel,
    wanted: Priority,
) -> Priority:
    request.state.model = alias
    limited = getattr(request.state, "rate_limited", None)
    if isinstance(limited, CorralError):
        raise limited
    principal = principal_of(request)
    key = principal.key if principal else None
    if key is not None and not key.allows_model(alias):
        raise PermissionDenied(
            f"This API key may not use the model {alias!r}.",
            param="model",
            code="model_not_allowed",
        )
    check_max_tokens(model, body)
    priority = wanted
    if key is not None and wanted.rank < key.max_priority.rank:
        cap = key.max_priority
        if settings.priority_over_cap == "reject":
            raise PermissionDenied(
                f"This API key may use priority {cap.value} at most, not {wanted.value}.",
                param="X-Request-Priority",
                code="priority_over_cap",
            )
        log.info("priority %s over the cap of key=%s: runs at %s", wanted, key.id, cap)
        priority = cap
    request.state.priority = priority.value
    return priority


def check_max_tokens(model: ModelConfig, body: WireModel) -> None:
    for param in ("max_tokens", "max_completion_tokens"):
        wanted = getattr(body, param, None)
        if isinstance(wanted, int) and isinstance(model.ctx_size, int) and wanted > model.ctx_size:
            raise InvalidRequest(
                f"{param}={wanted} is more than this model's context of {model.ctx_size} tokens.",
                param=param,
                code="context_length_exceeded",
            )

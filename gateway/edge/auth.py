"""The edge's authentication: every request but the open paths shows its key before its body
is read (`gateway.tenancy.principals` says who it is), then passes the key's rate limits
(`gateway.tenancy.ratelimit`). The principal goes into `request.state.principal`, the
`x-ratelimit-*` headers onto the reply, and the reply's token usage is charged to the key
once it is done. A generation request over its key's limits is refused once its model is
known (`request.state.rate_limited`, raised by `gateway.tenancy.admission`), so its 429 is
counted under that model, as OpenAI's names the model; any other request at once."""

from __future__ import annotations

import logging

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.apikeys import ApiKey
from common.errors import CorralError, RateLimited
from common.settings import Settings
from gateway.edge.request_metrics import ENDPOINTS, usage_of
from gateway.errors import send_error
from gateway.monitoring.metrics import GatewayMetrics
from gateway.tenancy.principals import (
    DOCS_PATHS,
    UI_ASSETS,
    UI_PAGES,
    Authenticator,
    KeysEpoch,
)
from gateway.tenancy.ratelimit import RateLimiter, retry_seconds

log = logging.getLogger(__name__)

_UNAVAILABLE = CorralError(
    "Cannot check the API key right now.", code="auth_unavailable", status=503
)


class AuthMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        settings: Settings,
        redis: aioredis.Redis,
        epoch: KeysEpoch,
        metrics: GatewayMetrics,
    ) -> None:
        self.app = app
        self._auth = Authenticator(settings)
        self._redis = redis
        self._epoch = epoch
        self._metrics = metrics
        public = {"/health"} | ({"/metrics"} if settings.metrics_public else set())
        self._open = DOCS_PATHS | UI_PAGES | public
        self._limiter = RateLimiter(redis)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _open_path(scope["path"], self._open):
            await self.app(scope, receive, send)
            return
        headers: dict[str, str] = {}
        counted = False  # admitted against the key's limits: settled once it is answered
        limited: _Limited | None = None
        try:
            header = Headers(scope=scope).get("authorization")
            principal = await self._auth.authenticate(self._redis, header, self._epoch.value)
            if principal.key is not None and scope["path"] in ENDPOINTS:
                headers = await self._admit(principal.key)  # generation requests only count
                counted = True
        except _Limited as err:
            log.info("%s %s refused: %s", scope["method"], scope["path"], err.code)
            limited = err  # the route refuses it once the model is known (metrics by model)
        except CorralError as err:
            log.info("%s %s refused: %s", scope["method"], scope["path"], err.code)
            challenge = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
            await send_error(send, err, challenge)
            return
        except RedisError as exc:
            log.warning("cannot check the API key: %r", exc)
            await send_error(send, _UNAVAILABLE)
            return
        state = scope.setdefault("state", {})
        state["principal"] = principal
        if limited is not None:
            state["rate_limited"] = limited

        status = 0

        async def send_with_limits(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if headers:
                    MutableHeaders(scope=message).update(headers)
            await send(message)

        try:
            await self.app(scope, receive, send_with_limits)
        finally:
            if counted and principal.key is not None:
                await self._settle(principal.key, scope, status)

    async def _admit(self, key: ApiKey) -> dict[str, str]:
        decision = await self._limiter.admit(key)
        if not decision.allowed:
            self._metrics.ratelimited.labels(key=key.name, limit=str(decision.limited_by)).inc()
            raise _Limited(key, decision.limited_by, decision.retry_after, decision.headers)
        return decision.headers

    async def _settle(self, key: ApiKey, scope: Scope, status: int) -> None:
        """Charge what the request used; give its request back if it was refused before
        it ran (a 4xx other than a rate limit or a full queue: it never ran)."""
        usage = usage_of(scope) or {}
        total = int(usage.get("total_tokens") or 0)
        try:
            if 400 <= status < 500 and status != 429 and not total:
                await self._limiter.refund(key)
            elif total and key.tpm:
                await self._limiter.charge(key, total)
        except RedisError as exc:
            log.warning("could not settle the usage of key=%s: %r", key.id, exc)


class _Limited(RateLimited):
    """A refusal that carries the limit's `x-ratelimit-*` headers with it."""

    def __init__(self, key: ApiKey, dimension: str | None, retry: float, headers: dict[str, str]):
        limit = key.rpm if dimension == "requests" else key.tpm
        reset = headers.get(f"x-ratelimit-reset-{dimension}", "")
        super().__init__(
            f"Rate limit reached for key {key.name!r} on {dimension} per minute (limit "
            f"{limit}). Retry in {retry_seconds(retry)} s (Retry-After); the limit is whole "
            f"again in {reset} (x-ratelimit-reset-{dimension}).",
            code=f"rate_limit_{dimension}",
            retry_after=retry,
        )
        self.extra = headers

    def headers(self) -> dict[str, str]:
        return {**self.extra, **super().headers()}


def _open_path(path: str, exact: frozenset[str] | set[str]) -> bool:
    return path in exact or path.startswith(UI_ASSETS)

"""Who is calling: the `Authorization: Bearer` key of every request, checked before its
body is read, then the key's rate limits (`gateway.ratelimit`).

- The admin key (`CORRAL_ADMIN_KEY`) may do everything, management routes included.
- A user key (`corral keys create`) may use the OpenAI, batch and request routes, on what
  it made itself (`gateway.tenancy`); every other route answers it 403. Routes are told
  apart by their tags, so a route added later without one of `USER_TAGS` is admin-only:
  closed unless opened on purpose.
- No key configured at all (no admin key, no user key in Redis): the gateway is open, but
  only on a loopback address or with `--insecure`; bound elsewhere it refuses to start
  (`check_exposure`), and if every key is revoked later it answers 401, never opens.

Secrets are never logged; the log names a key by its id and name.

Key lookups are cached (per secret, `CACHE_S`), saving a Redis round trip on every request:
`corral keys create/revoke` publish `keys.KEYS_CHANGED`, which the gateway's pub/sub
connection turns into a new `keys_epoch`, and no cached lookup outlives its epoch. A
revoked key is refused at once; the time limit only guards against a lost note.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import redis
import redis.asyncio as aioredis
from fastapi import Request
from redis.exceptions import RedisError
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common import keys
from common.apikeys import ApiKey, digest, same_secret
from common.errors import AuthenticationFailed, CorralError, PermissionDenied, RateLimited
from common.settings import Settings
from gateway.limits import send_error
from gateway.metrics import GatewayMetrics, usage_of
from gateway.ratelimit import RateLimiter

log = logging.getLogger(__name__)

CACHE_S = 5.0
CACHE_MAX = 4096  # lookups kept (secrets, right or wrong); all are dropped when full
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
USER_TAGS = frozenset({"openai", "requests", "batch"})


class Role(StrEnum):
    ADMIN = "admin"
    USER = "user"
    OPEN = "open"  # no key configured: everything allowed (loopback or --insecure only)


@dataclass(frozen=True)
class Principal:
    role: Role
    key: ApiKey | None = None

    def __str__(self) -> str:
        return f"key={self.key.id} name={self.key.name}" if self.key else f"role={self.role}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(settings: Settings, client: redis.Redis) -> str | None:
    """At start: why this gateway must not run (keyless on a reachable address), or None.
    Says so when it runs open on loopback."""
    if settings.admin_key is not None or client.exists(keys.API_KEYS):
        return None
    where = f"{settings.host}:{settings.port}"
    if settings.insecure:
        log.warning("no API keys configured: OPEN to anyone who can reach %s (--insecure)", where)
        return None
    if is_loopback(settings.host):
        log.warning("no API keys configured: open, but only on loopback (%s)", where)
        return None
    return (
        f"refusing to serve {where} without API keys: set CORRAL_ADMIN_KEY (and create user "
        "keys with `corral keys create`), bind a loopback address, or pass --insecure"
    )


def exposure_problem(settings: Settings) -> str | None:
    """`check_exposure` with a client of its own (for `corral gateway`, before it binds)."""
    client = redis.Redis.from_url(settings.require_redis_url())
    try:
        return check_exposure(settings, client)
    except redis.RedisError as exc:
        return f"cannot reach Redis to look for API keys: {exc}"
    finally:
        client.close()


def bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


class Authenticator:
    def __init__(self, settings: Settings) -> None:
        admin = settings.admin_key.get_secret_value() if settings.admin_key else None
        self._admin_digest = digest(admin) if admin else None
        self._open_allowed = settings.insecure or is_loopback(settings.host)
        # digest of the secret ("-": none) -> (keys epoch, read at, its record, any key?)
        self._cache: dict[str, tuple[int, float, str | None, bool]] = {}

    async def authenticate(
        self, client: aioredis.Redis, header: str | None, epoch: int = 0
    ) -> Principal:
        token = bearer(header)
        if token and self._admin_digest and same_secret(token, self._admin_digest):
            return Principal(Role.ADMIN)
        raw, any_keys = await self._lookup(client, digest(token) if token else "-", epoch)
        if raw is not None:
            key = ApiKey.model_validate_json(raw)
            if token and same_secret(token, key.digest):
                return Principal(Role.USER, key)
        if self._admin_digest is None and not any_keys and self._open_allowed:
            return Principal(Role.OPEN)
        if token is None:
            raise AuthenticationFailed(
                "Missing API key: send it as `Authorization: Bearer <key>`.",
                code="missing_api_key",
            )
        raise AuthenticationFailed("Invalid API key.")

    async def _lookup(
        self, client: aioredis.Redis, field: str, epoch: int
    ) -> tuple[str | None, bool]:
        """The key stored under `field`, and whether any key exists: from the cache if
        read in this `epoch` (no key changed since) less than `CACHE_S` ago."""
        now = time.monotonic()
        hit = self._cache.get(field)
        if hit is not None and hit[0] == epoch and now - hit[1] < CACHE_S:
            return hit[2], hit[3]
        pipe = client.pipeline(transaction=False)
        pipe.hget(keys.API_KEYS, field)
        pipe.exists(keys.API_KEYS)
        raw, any_keys = await pipe.execute()
        if len(self._cache) >= CACHE_MAX:
            self._cache.clear()
        self._cache[field] = (epoch, now, raw, bool(any_keys))
        return raw, bool(any_keys)


class AuthMiddleware:
    """Authenticates and rate-limits every request but the open paths, before its body is
    read; puts its `Principal` in `request.state.principal` and the `x-ratelimit-*`
    headers on its reply; charges the reply's token usage to the key when it is done."""

    def __init__(self, app: ASGIApp, settings: Settings, metrics: GatewayMetrics) -> None:
        self.app = app
        self._auth = Authenticator(settings)
        self._metrics = metrics
        self._open = DOCS_PATHS | {"/health"} | ({"/metrics"} if settings.metrics_public else set())
        self._limiter: RateLimiter | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self._open:
            await self.app(scope, receive, send)
            return
        state = scope["app"].state.corral
        client: aioredis.Redis = state.redis
        headers: dict[str, str] = {}
        try:
            header = Headers(scope=scope).get("authorization")
            principal = await self._auth.authenticate(client, header, state.hub.keys_epoch)
            if principal.key is not None:
                headers = await self._admit(client, principal.key)
        except CorralError as err:
            log.info("%s %s refused: %s", scope["method"], scope["path"], err.code)
            challenge = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
            await send_error(send, err, challenge)
            return
        except RedisError as exc:
            log.warning("cannot check the API key: %r", exc)
            await send_error(send, _UNAVAILABLE)
            return
        scope.setdefault("state", {})["principal"] = principal

        async def send_with_limits(message: Message) -> None:
            if message["type"] == "http.response.start" and headers:
                MutableHeaders(scope=message).update(headers)
            await send(message)

        try:
            await self.app(scope, receive, send_with_limits)
        finally:
            if principal.key is not None and principal.key.tpm:
                await self._charge(principal.key, scope)

    async def _admit(self, client: aioredis.Redis, key: ApiKey) -> dict[str, str]:
        if self._limiter is None:
            self._limiter = RateLimiter(client)
        decision = await self._limiter.admit(key)
        if not decision.allowed:
            self._metrics.ratelimited.labels(key=key.name, limit=str(decision.limited_by)).inc()
            raise _Limited(key, decision.limited_by, decision.retry_after, decision.headers)
        return decision.headers

    async def _charge(self, key: ApiKey, scope: Scope) -> None:
        usage = usage_of(scope) or {}
        total = int(usage.get("total_tokens") or 0)
        if total and self._limiter is not None:
            try:
                await self._limiter.charge(key, total)
            except RedisError as exc:
                log.warning("could not charge %d tokens to key=%s: %r", total, key.id, exc)


_UNAVAILABLE = CorralError(
    "Cannot check the API key right now.", code="auth_unavailable", status=503
)


class _Limited(RateLimited):
    def __init__(self, key: ApiKey, dimension: str | None, retry: float, headers: dict[str, str]):
        super().__init__(
            f"Rate limit reached for key {key.name!r}: {dimension} per minute. "
            f"Retry in {max(1, round(retry))} s.",
            code=f"rate_limit_{dimension}",
            retry_after=retry,
        )
        self.extra = headers

    def headers(self) -> dict[str, str]:
        return {**self.extra, **super().headers()}


def principal_of(request: Request) -> Principal | None:
    principal: Any = getattr(request.state, "principal", None)
    return principal if isinstance(principal, Principal) else None


async def authorize(request: Request) -> None:
    """App-wide dependency: a user key may use only routes tagged for users (403)."""
    principal = principal_of(request)
    if principal is None or principal.role is not Role.USER:
        return  # an open path, the admin key, or an open gateway
    route = request.scope.get("route")
    tags = set(getattr(route, "tags", None) or ())
    if not tags & USER_TAGS:
        raise PermissionDenied("This route needs the admin key.", code="admin_key_required")

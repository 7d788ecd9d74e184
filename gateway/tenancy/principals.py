"""Who is calling: the `Authorization: Bearer` key of a request, as a `Principal`.

- The admin key (`CORRAL_ADMIN_KEY`) may do everything, management routes included.
- A user key (`corral keys create`) may use the OpenAI, batch and request routes, on what
  it made itself (`gateway.tenancy.ownership`), and watch the model status stream (its own
  part of it); every other route answers it 403. Routes
  are told apart by their tags, so a route added later without one of `USER_TAGS` is
  admin-only: closed unless opened on purpose.
- No key configured at all (no admin key, no user key in Redis): the gateway is open, but
  only on a loopback address or with `--insecure` (`gateway.tenancy.exposure`).
- An admin key with `open_until_user_keys` (`corral up`'s local key) keeps that: the
  gateway stays open as above until a user key exists, and the admin key is one more
  credential. Any other admin key closes the gateway to callers without a key.

Secrets are never logged; the log names a key by its id and name.

Key lookups are cached (per secret, `CACHE_S`), saving a Redis round trip on every request:
`corral keys create/revoke` publish `redis_keys.KEYS_CHANGED`, which the gateway's pub/sub
connection turns into a new `KeysEpoch`, and no cached lookup outlives its epoch. A
revoked key is refused at once; the time limit only guards against a lost note.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import redis.asyncio as aioredis
from fastapi import Request

from common import redis_keys
from common.apikeys import ApiKey, digest, same_secret
from common.errors import AuthenticationFailed, PermissionDenied
from common.net import is_loopback
from common.settings import Settings

CACHE_S = 5.0
CACHE_MAX = 4096  # lookups kept (secrets, right or wrong); all are dropped when full
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
STATUS_TAG = "status"  # the model status stream: user keys watch their own part of it
USER_TAGS = frozenset({"openai", "requests", "batch", STATUS_TAG})
# The status page and its assets: open, like the docs (they hold no data; the page asks
# for a key and sends it with every data request).
UI_PAGES = frozenset({"/", "/ui"})
UI_ASSETS = "/ui/static/"


class KeysEpoch:
    """Which generation of API keys cached lookups belong to. The gateway's pub/sub
    connection is its one writer (`bump` on each KEYS_CHANGED note and each reconnection);
    the authenticating middleware reads it."""

    def __init__(self) -> None:
        self.value = 0

    def bump(self) -> None:
        self.value += 1


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
        self._admin_closes = admin is not None and not settings.open_until_user_keys
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
        if not self._admin_closes and not any_keys and self._open_allowed:
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
        pipe.hget(redis_keys.API_KEYS, field)
        pipe.exists(redis_keys.API_KEYS)
        raw, any_keys = await pipe.execute()
        if len(self._cache) >= CACHE_MAX:
            self._cache.clear()
        self._cache[field] = (epoch, now, raw, bool(any_keys))
        return raw, bool(any_keys)


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

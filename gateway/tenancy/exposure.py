"""Whether this gateway may run at all: never keyless on an address others can reach.

Checked at start (`corral gateway`, `corral up`): with no admin key and no user key in
Redis, a gateway bound beyond loopback refuses to start unless `--insecure` is given; on
loopback it runs open and says so. An admin key that leaves the gateway open until a user
key exists (`open_until_user_keys`: `corral up`'s local key) counts as none here.
"""

from __future__ import annotations

import logging

import redis

from common import redis_keys
from common.net import is_loopback
from common.redis_conn import RedisTarget
from common.settings import Settings

log = logging.getLogger(__name__)


def check_exposure(settings: Settings, client: redis.Redis) -> str | None:
    """At start: why this gateway must not run (keyless on a reachable address), or None.
    Says so when it runs open on loopback."""
    closing_admin = settings.admin_key is not None and not settings.open_until_user_keys
    if closing_admin or client.exists(redis_keys.API_KEYS):
        return None
    where = f"{settings.host}:{settings.port}"
    none = "no user API key yet" if settings.admin_key else "no API keys configured"
    if settings.insecure:
        log.warning("%s: OPEN to anyone who can reach %s (--insecure)", none, where)
        return None
    if is_loopback(settings.host):
        log.warning("%s: open, but only on loopback (%s)", none, where)
        return None
    return (
        f"refusing to serve {where} without API keys: set CORRAL_ADMIN_KEY (and create user "
        "keys with `corral keys create`), bind a loopback address, or pass --insecure"
    )


def exposure_problem(settings: Settings) -> str | None:
    """`check_exposure` with a client of its own (for `corral gateway`, before it binds)."""
    client = RedisTarget.of(settings).client()
    try:
        return check_exposure(settings, client)
    except redis.RedisError as exc:
        return f"cannot reach Redis to look for API keys: {exc}"
    finally:
        client.close()

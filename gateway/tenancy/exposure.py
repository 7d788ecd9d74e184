"""Whether this gateway may run at all: never keyless on an address others can reach.

Checked at start (`corral gateway`, `corral up`): with no admin key and no user key in
Redis, a gateway bound beyond loopback refuses to start unless `--insecure` is given; on
loopback it runs open and says so.
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
    if settings.admin_key is not None or client.exists(redis_keys.API_KEYS):
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
    client = RedisTarget.of(settings).client()
    try:
        return check_exposure(settings, client)
    except redis.RedisError as exc:
        return f"cannot reach Redis to look for API keys: {exc}"
    finally:
        client.close()

"""`corral flower`: Flower (2.2+) on the cluster's broker, behind basic auth, listing every
per-model priority queue (`p1-high.<alias>`, ...) with its depth.

Flower runs in this process on a Celery app built from the same `celery_config` as the
gateway and the workers. Two things are added to plain `celery flower`:
- access: basic auth from `--basic-auth` or `CORRAL_FLOWER_USER`/`CORRAL_FLOWER_PASSWORD`;
  without credentials it refuses to start unless `--unauthenticated` on a loopback address
  (Flower can revoke tasks and shut workers down). Flower then still keeps its REST API
  closed unless its own `FLOWER_UNAUTHENTICATED_API` is set.
- queues: Flower's queue views (`/api/queues/length`, the Broker page) only know the
  queues its last `inspect().active_queues()` round saw, i.e. those of workers that were
  up when Flower started or last refreshed. Requests for a model nobody holds yet wait in
  queues no worker consumes, so the cluster catalog's models are added to that list.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping

import redis
from celery import Celery

from common import redis_keys
from common.celery_config import celery_config
from common.net import is_loopback
from common.redis_conn import RedisTarget
from common.settings import Settings

log = logging.getLogger(__name__)

USER_ENV = "CORRAL_FLOWER_USER"
PASSWORD_ENV = "CORRAL_FLOWER_PASSWORD"


class FlowerRefused(ValueError):
    """`corral flower` will not start as asked; the CLI prints why and exits with 2."""


def basic_auth(flag: str | None, env: Mapping[str, str]) -> str | None:
    """`user:password` from `--basic-auth`, else from the environment; None if neither."""
    if flag is not None:
        user, sep, password = flag.partition(":")
        if not (user and sep and password):
            raise FlowerRefused("--basic-auth must be USER:PASSWORD, both non-empty")
        return flag
    user, password = env.get(USER_ENV, ""), env.get(PASSWORD_ENV, "")
    if bool(user) != bool(password):
        raise FlowerRefused(f"set both {USER_ENV} and {PASSWORD_ENV}, or neither")
    if ":" in user:
        raise FlowerRefused(f"{USER_ENV} must not contain ':' (HTTP basic auth)")
    return f"{user}:{password}" if user else None


def check_access(credentials: str | None, address: str, unauthenticated: bool) -> None:
    """Refuse to serve Flower without credentials, except when told to on loopback."""
    if credentials:
        return
    if not unauthenticated:
        raise FlowerRefused(
            "refusing to start Flower without credentials: pass --basic-auth USER:PASSWORD "
            f"or set {USER_ENV} and {PASSWORD_ENV} (or --unauthenticated, loopback only)"
        )
    if not is_loopback(address):
        raise FlowerRefused(
            f"--unauthenticated is allowed only on a loopback --address, not {address!r}: "
            "anyone who reaches Flower can revoke tasks and shut workers down"
        )


def flower_app(settings: Settings, redis_url: str) -> Celery:
    """A Celery app with the cluster's config (broker, transport options, events)."""
    app = Celery("corral")
    app.conf.update(celery_config(settings, redis_url=redis_url))
    return app


def flower_argv(address: str, port: int) -> list[str]:
    """`celery flower` arguments. Credentials go in through Flower's options object instead
    (`use_basic_auth`): Flower splits `--basic-auth` on commas, which passwords may hold."""
    return ["flower", f"--address={address}", f"--port={port}"]


def use_basic_auth(credentials: str) -> None:
    from flower.options import default_options  # the tornado options Flower defines

    default_options.basic_auth = [credentials]


class ModelQueues:
    """The queue names of every model the cluster knows: this config's models and those
    announced in the catalog (by gateways and workers)."""

    def __init__(self, settings: Settings, client: redis.Redis) -> None:
        """`client` must decode responses (`decode_responses=True`)."""
        self._settings = settings
        self._redis = client

    def names(self) -> set[str]:
        aliases = set(self._settings.models)
        try:
            aliases.update(str(a) for a in self._redis.hkeys(redis_keys.CATALOG))
        except redis.RedisError as exc:
            log.warning("flower: cannot read the model catalog: %s", exc)
        return {q for alias in aliases for q in redis_keys.worker_queues(alias)}


def show_model_queues(queues: ModelQueues) -> None:
    """Make Flower's queue views list every model's queues as well as its workers'."""
    from flower.views import BaseHandler

    inspected: Callable[[object], list[str]] = BaseHandler.get_active_queue_names

    def get_active_queue_names(handler: object) -> list[str]:
        return sorted(set(inspected(handler)) | queues.names())

    BaseHandler.get_active_queue_names = get_active_queue_names


def run_flower(
    settings: Settings,
    *,
    address: str,
    port: int,
    basic_auth_flag: str | None = None,
    unauthenticated: bool = False,
    env: Mapping[str, str] | None = None,
) -> int:
    """Check access, then serve Flower until SIGTERM/Ctrl-C. Returns the exit code."""
    credentials = basic_auth(basic_auth_flag, os.environ if env is None else env)
    check_access(credentials, address, unauthenticated)
    if not settings.redis_url:
        raise FlowerRefused(
            "no Redis URL and no `corral up` running here: pass --redis-url or set CORRAL_REDIS_URL"
        )
    app = flower_app(settings, settings.redis_url)
    if credentials:
        use_basic_auth(credentials)
    # Short timeouts: the catalog is read on Flower's IO loop, once per queue-view request.
    client = RedisTarget.of(settings).client(
        socket_timeout=1.0, socket_connect_timeout=1.0, decode_responses=True
    )
    show_model_queues(ModelQueues(settings, client))
    log.info(
        "flower address=%s port=%d broker=%s auth=%s",
        address,
        port,
        RedisTarget.of(settings),
        "basic" if credentials else "none (loopback)",
    )
    try:
        return app.start(flower_argv(address, port)) or 0
    finally:
        client.close()
        app.close()

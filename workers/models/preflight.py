"""What a load needs before anything is evicted for it: the model's file read and found
loadable (its GGUF header; a broken file fails here, with nothing unloaded), its memory need
on this worker (what a worker measured for the same profile, else `vram_mb`, else the GGUF
estimate), and its context (`ctx_size: auto` grows to the room the device has).

The header's facts are cached in Redis per file version (`redis_keys.gguf_shape_key`), so a
file is read once for every gateway and worker; a file that is not a GGUF is cached as such.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis

from common import redis_keys
from common.errors import ModelBroken
from common.estimate import (
    ModelShape,
    cache_value,
    context_of,
    estimate,
    file_identity,
    fit_context,
    from_cache,
    read_checked,
)
from common.memory import profile
from common.settings import ModelConfig, Settings
from workers.hardware import usage

log = logging.getLogger(__name__)

SHAPE_TTL_S = 7 * 24 * 3600


@dataclass(frozen=True)
class Prepared:
    """A load that may go ahead: its config as llama-server gets it (path resolved, context
    a number) and what it needs."""

    config: ModelConfig
    profile: str
    need_mb: int | None
    estimate_mb: int | None


def shape_of(client: redis.Redis, config: ModelConfig) -> ModelShape:
    """The model file's header facts (read once per file version, then from Redis). Raises
    `ModelBroken` with a reason fit for clients (no paths) and the whole story."""
    path = config.model_path
    try:
        key = redis_keys.gguf_shape_key(file_identity(path))
    except OSError as exc:
        raise ModelBroken("its model file is missing or unreadable", f"{path}: {exc}") from None
    cached = _cached(client, key)
    try:
        if cached is not None:
            return from_cache(cached)
        shape = read_checked(path)
    except ModelBroken as err:
        if cached is None:
            _store(client, key, cache_value(err))
        raise ModelBroken(err.public, f"{path}: {err.public}") from None
    except OSError as exc:
        raise ModelBroken("its model file is unreadable", f"{path}: {exc}") from None
    _store(client, key, cache_value(shape))
    return shape


def prepare(
    settings: Settings,
    client: redis.Redis,
    alias: str,
    config: ModelConfig,
    *,
    slots: int,
    device: str,
    free_mb: int | None,
) -> Prepared:
    """Check the file and work out the load (raises `ModelBroken`). `free_mb` is the room
    the device has for it now (None: unknown), which an `auto` context grows into."""
    config = settings.resolved(config)
    shape = shape_of(client, config)
    auto = config.ctx_size == "auto"
    if auto:
        room = free_mb if free_mb is not None else 0
        ctx = fit_context(shape, room, slots=slots, flags=config.flags, device=device)
    else:
        ctx = context_of(shape, config.ctx_size, slots)
    est = estimate(shape, ctx_size=ctx, slots=slots, flags=config.flags, device=device).total_mb
    prof = profile(config, slots, device)
    known = None if auto else usage.read(client, alias, prof)  # auto: its ctx varies
    need = config.vram_mb or (known.best_mb() if known else None) or est
    return Prepared(config.model_copy(update={"ctx_size": ctx}), prof, need, est)


def _cached(client: redis.Redis, key: str) -> str | None:
    try:
        raw = client.get(key)
    except redis.RedisError:
        return None
    return raw.decode() if isinstance(raw, bytes) else raw


def _store(client: redis.Redis, key: str, value: str) -> None:
    try:
        client.set(key, value, ex=SHAPE_TTL_S)
    except redis.RedisError as exc:
        log.warning("could not cache a GGUF header reading: %r", exc)

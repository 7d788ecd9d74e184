"""What a load needs before anything is evicted for it: the model's file read and found
loadable (its GGUF header; a broken file fails here, with nothing unloaded), its memory need
on this worker (`vram_mb`, else what a worker measured for the same profile, else what the
engine claims by its own flag — vLLM's `--gpu-memory-utilization` of the device's budget —
else the GGUF estimate), and its context (`ctx_size: auto` grows to the room the device
has). A model on another engine that is not a GGUF file is not read: its engine says at
load time whether it can run it.

The header's facts are cached in Redis per file version (`redis_keys.gguf_shape_key`), so a
file is read once for every gateway and worker; a file that is not a GGUF is cached as such.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import redis

from common import redis_keys
from common.engines import claimed_mb
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
    """A load that may go ahead: its config as the engine gets it (path resolved, context
    a number) and what it needs."""

    config: ModelConfig
    profile: str
    need_mb: int | None
    estimate_mb: int | None
    shape: ModelShape | None = None  # kept for `ctx_size: auto`, which grows once room is held


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
    budget_mb: int | None = None,
) -> Prepared:
    """Check the file and work out the load (raises `ModelBroken`). `budget_mb`: the
    device's, for an engine that claims a fraction of it."""
    config = settings.resolved(config)
    prof = profile(config, slots, device)
    claimed = claimed_mb(config.engine_flags, budget_mb)
    if not config.is_gguf:  # another engine's model: no header to read (ctx is a number)
        known = usage.read(client, alias, prof)
        need = config.vram_mb or (known.best_mb() if known else None) or claimed
        return Prepared(config, prof, need, None)
    shape = shape_of(client, config)
    auto = config.ctx_size == "auto"
    ctx = context_of(shape, config.ctx_size, slots)  # auto: the least it may get, for now
    est = estimate(shape, ctx_size=ctx, slots=slots, flags=config.flags, device=device).total_mb
    known = None if auto else usage.read(client, alias, prof)  # auto: its ctx varies
    need = config.vram_mb or (known.best_mb() if known else None) or claimed or est
    fixed = config.model_copy(update={"ctx_size": ctx})
    return Prepared(fixed, prof, need, est, shape if auto else None)


def grow(ready: Prepared, free_mb: int, *, slots: int, device: str) -> Prepared:
    """`ctx_size: auto`, once the least it needs is held: the largest context that the
    room the device has for it (`free_mb`, its own share included) holds."""
    if ready.shape is None:
        return ready
    flags = ready.config.flags
    ctx = fit_context(ready.shape, free_mb, slots=slots, flags=flags, device=device)
    est = estimate(ready.shape, ctx_size=ctx, slots=slots, flags=flags, device=device).total_mb
    return dataclasses.replace(
        ready,
        config=ready.config.model_copy(update={"ctx_size": ctx}),
        need_mb=est,
        estimate_mb=est,
    )


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

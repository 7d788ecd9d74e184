"""How much memory a model needs on a given worker, as placement should believe it, and
whether its file can load at all.

In order: what a worker measured for the same profile (device, ctx, slots, flags, engine) —
the estimates of other tools are off by large factors, a measurement is not; else the
config's `vram_mb`; else what the engine claims by its own flag (vLLM's
`--gpu-memory-utilization` of the worker's device budget); else the GGUF estimate; else
unknown (placement then prefers the roomiest device, and the worker that loads it works
the need out itself). A model on another engine that is not a GGUF file has no header to
read: it is never marked broken here, its engine says at load time.

The estimate comes from the file's header, read where this gateway can see the file: once
per file version for the whole cluster (kept in Redis, `redis_keys.gguf_shape_key`, where
workers read it too) and once at a time here (concurrent cold requests share one reading),
off the event loop. A file that is not a loadable GGUF raises `ModelBroken` here, before
placement evicts anything for it.
"""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from common import redis_keys
from common.engines import claimed_mb
from common.errors import ModelBroken
from common.estimate import (
    ModelShape,
    cache_value,
    estimate,
    file_identity,
    from_cache,
    read_checked,
)
from common.memory import MemoryRecord, device_of, profile
from common.registry import WorkerInfo
from common.settings import ModelConfig

log = logging.getLogger(__name__)

SHAPE_TTL_S = 7 * 24 * 3600


class Needs:
    def __init__(self, client: aioredis.Redis) -> None:
        self._redis = client
        self._shapes: dict[str, ModelShape] = {}  # file identity -> its header's facts
        self._reading: dict[str, asyncio.Future[ModelShape | None]] = {}
        self._seen: set[str] = set()  # file identities read here, loadable or not

    async def records(self, alias: str) -> dict[str, MemoryRecord]:
        raw = await self._redis.hgetall(redis_keys.memory_key(alias))
        return {str(k): MemoryRecord.model_validate_json(v) for k, v in raw.items()}

    async def need_mb(
        self, model: ModelConfig, worker: WorkerInfo, records: dict[str, MemoryRecord]
    ) -> int | None:
        device = device_of(worker.gpu)
        rec = records.get(profile(model, worker.slots, device))
        if rec is not None and (rec.measured_mb or rec.peak_mb) and model.ctx_size != "auto":
            return rec.best_mb()
        if model.vram_mb:
            return model.vram_mb
        claimed = claimed_mb(model.engine_flags, worker.budget_mb)
        if claimed:
            return claimed
        shape = await self.shape(model)
        if shape is None:
            return None
        slots = worker.slots
        return estimate(
            shape, ctx_size=model.ctx_size, slots=slots, flags=model.flags, device=device
        ).total_mb

    async def shape(self, model: ModelConfig) -> ModelShape | None:
        """The file's header facts; None if this gateway cannot see the file (the worker
        will read it) or the model is not a GGUF. Raises `ModelBroken` for a file that
        cannot load."""
        if not model.is_gguf:
            return None
        try:
            identity = file_identity(model.model_path)
        except OSError:
            return None
        known = self._shapes.get(identity)
        if known is not None:
            return known
        self._seen.add(identity)
        reading = self._reading.get(identity)
        if reading is None:
            reading = asyncio.get_running_loop().create_future()
            self._reading[identity] = reading
            try:
                shape = await self._read(model, identity)
            except BaseException as exc:
                reading.set_exception(exc)
                reading.exception()  # retrieved: the waiters (if any) get it too
                raise
            finally:
                self._reading.pop(identity, None)
            reading.set_result(shape)
            if shape is not None:
                self._shapes[identity] = shape
            return shape
        return await asyncio.shield(reading)

    def seen(self, model: ModelConfig) -> bool:
        """Whether this version of the model's file was read here already (a model with
        no GGUF to read counts as read)."""
        if not model.is_gguf:
            return True
        try:
            return file_identity(model.model_path) in self._seen
        except OSError:
            return False

    async def _read(self, model: ModelConfig, identity: str) -> ModelShape | None:
        key = redis_keys.gguf_shape_key(identity)
        cached = None
        try:
            cached = await self._redis.get(key)
        except RedisError as exc:
            log.warning("cannot read the cached header of %s: %r", model.model_path.name, exc)
        if cached is not None:
            return from_cache(cached)
        try:
            shape = await asyncio.to_thread(read_checked, model.model_path)
        except OSError:
            return None  # gone or unreadable here: the worker will say
        except ModelBroken as err:
            await self._keep(key, cache_value(err))
            raise
        await self._keep(key, cache_value(shape))
        return shape

    async def _keep(self, key: str, value: str) -> None:
        try:
            await self._redis.set(key, value, ex=SHAPE_TTL_S)
        except RedisError as exc:
            log.warning("could not cache a GGUF header reading: %r", exc)

"""How much memory a model needs on a given worker, as placement should believe it.

In order: what a worker measured for the same profile (device, ctx, slots, flags) — the
estimates of other tools are off by large factors, a measurement is not; else the
config's `vram_mb`; else the GGUF estimate (read here when this gateway can see the file,
cached by file identity); else unknown (placement then prefers the largest budget, and the
first load measures it).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import redis.asyncio as aioredis

from common import redis_keys
from common.estimate import Estimate, estimate_file
from common.memory import MemoryRecord, device_of, profile
from common.registry import WorkerInfo
from common.settings import ModelConfig

log = logging.getLogger(__name__)


class Needs:
    def __init__(self, client: aioredis.Redis) -> None:
        self._redis = client
        self._estimates: dict[tuple[object, ...], Estimate | None] = {}

    async def records(self, alias: str) -> dict[str, MemoryRecord]:
        raw = await self._redis.hgetall(redis_keys.memory_key(alias))
        return {str(k): MemoryRecord.model_validate_json(v) for k, v in raw.items()}

    async def need_mb(
        self, model: ModelConfig, worker: WorkerInfo, records: dict[str, MemoryRecord]
    ) -> int | None:
        device = device_of(worker.gpu)
        rec = records.get(profile(model, worker.slots, device))
        if rec is not None and (rec.measured_mb or rec.peak_mb):
            return rec.best_mb()
        if model.vram_mb:
            return model.vram_mb
        est = await self.estimate(model, worker.slots, device)
        return est.total_mb if est else None

    async def estimate(self, model: ModelConfig, slots: int, device: str) -> Estimate | None:
        path = Path(model.model_path)
        try:
            st = path.stat()
        except OSError:
            return None  # not visible from this gateway: the worker will measure it
        key = (
            str(path),
            st.st_size,
            st.st_mtime_ns,
            model.ctx_size,
            slots,
            device,
            tuple(model.flags),
        )
        if key not in self._estimates:
            try:
                self._estimates[key] = await asyncio.to_thread(
                    estimate_file,
                    path,
                    ctx_size=model.ctx_size,
                    slots=slots,
                    flags=model.flags,
                    device=device,
                )
            except Exception as exc:  # not a GGUF we can read: llama-server will say why
                log.info("model=%s no estimate from %s: %r", path.stem, path, exc)
                self._estimates[key] = None
        return self._estimates[key]

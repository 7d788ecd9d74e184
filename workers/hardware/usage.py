"""What a worker's llama-server really uses, and the cluster's record of it.

On the CPU: the child's RSS (weights are memory-mapped and touched by llama-server's
warm-up; the KV cache is cleared at start, so it is resident too), and its peak RSS
(`VmHWM`) when it unloads — compute buffers are only touched by long prompts. On a GPU:
NVML's per-process VRAM. Records are keyed by model + profile (device, ctx, slots, flags)
in `redis_keys.memory_key(alias)`, where placement and `corral models estimate` read them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import psutil
import redis

from common import redis_keys
from common.memory import MemoryRecord
from workers.hardware import gpu as gpus

log = logging.getLogger(__name__)


def used_mb(pid: int, gpu: int | None) -> int | None:
    """Memory the child `pid` and the processes it started use now: VRAM on `gpu`, else
    their RSS (an engine may serve from several processes). None if it is gone."""
    family = _family(pid)
    try:
        if gpu is not None:
            return gpus.process_used_mb(gpu, {p.pid for p in family} or {pid})
        if not family:
            return None
        return sum(_rss(p) for p in family) // 2**20
    except gpus.GPUUnavailable:
        return None


def _family(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _rss(proc: psutil.Process) -> int:
    try:
        return int(proc.memory_info().rss)
    except psutil.Error:  # one that exited meanwhile
        return 0


def peak_rss_mb(pid: int) -> int | None:
    """The child's highest RSS so far (Linux `VmHWM`), or None."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def read(client: redis.Redis, alias: str, profile: str) -> MemoryRecord | None:
    raw = client.hget(redis_keys.memory_key(alias), profile)
    return MemoryRecord.model_validate_json(raw) if raw else None


def record(client: redis.Redis, alias: str, profile: str, rec: MemoryRecord) -> None:
    """Store `rec`, keeping the highest peak seen so far for this profile."""
    try:
        old = read(client, alias, profile)
        if old is not None and (old.peak_mb or 0) > (rec.peak_mb or 0):
            rec = rec.model_copy(update={"peak_mb": old.peak_mb})
        client.hset(redis_keys.memory_key(alias), profile, rec.model_dump_json())
        log.info(
            "model=%s profile=%s memory estimate_mb=%s measured_mb=%s peak_mb=%s worker=%s",
            alias,
            profile,
            rec.estimate_mb,
            rec.measured_mb,
            rec.peak_mb,
            rec.worker,
        )
    except redis.RedisError as exc:
        log.warning("model=%s could not record its memory: %r", alias, exc)

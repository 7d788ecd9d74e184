"""The cluster as one gateway sees it, read from Redis: the live workers' registry entries,
the depth of every model queue, and the requests running on live workers. Every reader of
these (placement, health, metrics, queue stats, batches) comes here, so "live" means one
thing: a worker whose registry entry (its heartbeat, `redis_keys.worker_key`) has not
expired. Dead workers are pruned from the registry set and the running sets as they are
found.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from common import redis_keys
from common.devices import Room, read_room
from common.priority import Priority
from common.registry import ModelState, WorkerInfo, WorkerState
from common.tracking import split_running_member


@dataclass
class View:
    workers: list[WorkerInfo]
    queued: dict[str, int] = field(default_factory=dict)  # alias -> tasks waiting (all queues)
    rooms: dict[str, Room] = field(default_factory=dict)  # device -> its memory ledger
    broken: dict[str, str] = field(default_factory=dict)  # alias -> why no worker may load it
    taken_at: float = field(default_factory=time.monotonic)

    def ready(self, alias: str) -> list[WorkerInfo]:
        return [w for w in self.workers if w.model == alias and w.state is WorkerState.READY]

    def state_of(self, alias: str) -> ModelState:
        """The cluster-wide state: ready if one copy is; else loading, unloading, failed, off."""
        states = {w.model_state(alias) for w in self.workers}
        if alias in self.broken:
            states.add(ModelState.FAILED)
        for s in (ModelState.READY, ModelState.LOADING, ModelState.UNLOADING, ModelState.FAILED):
            if s in states:
                return s
        return ModelState.OFF


async def read_workers(client: aioredis.Redis) -> list[WorkerInfo]:
    """Live workers (their entry has not expired), sorted by id; dead ids are pruned."""
    ids = sorted(str(m) for m in await client.smembers(redis_keys.WORKERS))
    if not ids:
        return []
    raw = await client.mget([redis_keys.worker_key(i) for i in ids])
    dead = [i for i, r in zip(ids, raw, strict=True) if r is None]
    if dead:
        await client.srem(redis_keys.WORKERS, *dead)
    return [WorkerInfo.model_validate_json(r) for r in raw if r is not None]


async def queue_depths(client: aioredis.Redis, aliases: list[str]) -> dict[str, dict[str, int]]:
    """Per model: requests waiting in each of its queues, named by priority (and `batch`).
    An interactive queue counts its live requests (not cancelled, not past their deadline:
    `redis_keys.live_key`), not the dead entries its list still holds."""
    pipe = client.pipeline(transaction=False)
    names: list[tuple[str, str]] = []
    now = time.time()
    for alias in aliases:
        for q in redis_keys.worker_queues(alias):
            names.append((alias, _queue_label(alias, q)))
            if q == redis_keys.batch_queue(alias):
                pipe.llen(q)
            else:
                pipe.zcount(redis_keys.live_key(q), now, "+inf")
    out: dict[str, dict[str, int]] = {a: {} for a in aliases}
    for (alias, label), n in zip(names, await pipe.execute(), strict=True):
        out[alias][label] = int(n)
    return out


def _queue_label(alias: str, queue: str) -> str:
    for p in Priority:
        if queue == redis_keys.queue_name(alias, p):
            return p.value
    return queue.split(".", 1)[0].split("-", 1)[-1]  # e.g. p4-batch.<alias> -> batch


async def running(client: aioredis.Redis, model: str) -> tuple[list[str], list[str]]:
    """The request ids running for `model` on live workers, and those whose worker is gone
    (pruned from the running set here: their reruns are the caller's business)."""
    members = [str(m) for m in await client.zrange(redis_keys.running_key(model), 0, -1)]
    if not members:
        return [], []
    workers = sorted({split_running_member(m)[0] for m in members})
    pipe = client.pipeline(transaction=False)
    for worker in workers:
        pipe.exists(redis_keys.worker_key(worker))
    alive = {w for w, up in zip(workers, await pipe.execute(), strict=True) if up}
    live, dead, gone = [], [], []
    for member in members:
        worker, request_id = split_running_member(member)
        if worker in alive:
            live.append(request_id)
        else:
            dead.append(member)
            gone.append(request_id)
    if dead:
        await client.zrem(redis_keys.running_key(model), *dead)
    return live, gone


async def read_rooms(client: aioredis.Redis, workers: list[WorkerInfo]) -> dict[str, Room]:
    """The memory ledger of each device the live `workers` are on (`common.devices`)."""
    devices = sorted({w.device for w in workers if w.device})
    if not devices:
        return {}
    pipe = client.pipeline(transaction=False)
    for device in devices:
        pipe.hgetall(redis_keys.device_key(device))
    live = {w.id for w in workers}
    ledgers = await pipe.execute()
    return {d: read_room(raw, live) for d, raw in zip(devices, ledgers, strict=True)}


async def read_view(client: aioredis.Redis, aliases: list[str] | None = None) -> View:
    workers = await read_workers(client)
    held = {w.model for w in workers if w.model} | set(aliases or [])
    depths = await queue_depths(client, sorted(held)) if held else {}
    rooms = await read_rooms(client, workers)
    broken = {str(k): str(v) for k, v in (await client.hgetall(redis_keys.MODELS_FAILED)).items()}
    return View(workers, {a: sum(d.values()) for a, d in depths.items()}, rooms, broken)


def worker_summary(w: WorkerInfo) -> dict[str, Any]:
    """One worker, for the status API (what `corral status` prints)."""
    return {
        "worker": w.id,
        "host": w.host,
        "gpu": w.gpu,
        "state": w.state.value,
        "model": w.model,
        "next_model": w.next_model,
        "slots": w.slots,
        "slots_busy": w.slots_busy,
        "device": w.device,
        "budget_mb": w.budget_mb,
        "used_mb": w.used_mb,
        "pinned": w.pinned,
        "loaded_at": w.loaded_at,
        "last_used": w.last_used,
        "restarts": w.restarts,
        "failed": dict(w.failed),
        "ctx_size": w.ctx_size,
    }

"""Placement: which worker loads a model that is not served enough. A pure function of the
workers' registry entries and their devices' memory ledgers (`common.devices`), so every
rule is unit-tested on plain data; `gateway.placement.placer` does the I/O.

Memory is the device's: several workers may share one GPU (or a host's CPU), each holding
one model, and a newcomer fits where its device has room. For each copy still wanted:
1. a worker already loading it counts as a copy (ten cold requests cause one load);
2. an empty worker on a device with room for it — the device that keeps the least room
   spare, so roomy devices stay free for big models (the roomiest when the need is unknown);
3. else, on one device, the fewest idle models to evict for it, least recently used first:
   idle (nothing running or queued), unpinned, and past `min_residency` unless the newcomer
   waited longer than `max_swap_wait`. A busy model is never evicted. The newcomer goes on
   an empty worker of that device, or in place of the first model evicted (a swap); the
   others are unloaded.
If no device's budget could ever hold the model, the answer is NO_CAPACITY with the need and
the largest budget; if it failed on a worker (until reset) and no copy is up, the answer is
FAILED, so requests get the reason at once instead of a load storm.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from common.devices import Room
from common.errors import CorralError, NoCapacity
from common.registry import WorkerState


class Outcome(StrEnum):
    SERVING = "serving"  # enough copies ready
    LOADING = "loading"  # enough copies ready or on their way
    LOAD = "load"  # `Plan.loads` says where
    WAIT = "wait"  # it would fit, but every such worker is busy: try again later
    NO_CAPACITY = "no_capacity"
    FAILED = "failed"


@dataclass(frozen=True)
class Candidate:
    """A live worker as placement sees it, with the target model's need on it."""

    id: str
    state: WorkerState
    budget_mb: int | None
    need_mb: int | None  # the target's need with this worker's slots and device; None: unknown
    model: str | None = None
    next_model: str | None = None
    busy: bool = False  # its model has tasks running or queued
    pinned: bool = False
    loaded_at: float | None = None
    last_used: float | None = None
    failed: Mapping[str, str] = field(default_factory=dict)  # alias -> why it failed here
    device: str | None = None  # the device it shares (None: a device of its own)
    held_mb: int | None = None  # what its model holds on the device (its ledger reservation)


@dataclass(frozen=True)
class Policy:
    min_residency: float = 30.0
    max_swap_wait: float = 10.0


@dataclass(frozen=True)
class Load:
    worker: str
    evict: str | None = None  # the worker's own model, unloaded first (a swap)


@dataclass(frozen=True)
class Unload:
    """Another worker's idle model, unloaded to make room on the device of a `Load`."""

    worker: str
    model: str


@dataclass(frozen=True)
class Plan:
    outcome: Outcome
    loads: tuple[Load, ...] = ()
    unloads: tuple[Unload, ...] = ()
    reason: str = ""
    need_mb: int | None = None
    largest_budget_mb: int | None = None
    copies: int = 0  # copies ready or loading before this plan


def _device(w: Candidate) -> str:
    return w.device or f"worker:{w.id}"


def _fits(w: Candidate, rooms: Mapping[str, Room]) -> bool:
    """Whether the worker's budget, and its device's, could ever hold the model."""
    budgets = [w.budget_mb, _room_budget(w, rooms)]
    return w.need_mb is None or all(b is None or w.need_mb <= b for b in budgets)


def _room_budget(w: Candidate, rooms: Mapping[str, Room]) -> int | None:
    room = rooms.get(w.device) if w.device else None
    return room.budget_mb if room is not None and room.budget_mb is not None else w.budget_mb


def _holds(w: Candidate, alias: str) -> bool:
    """Serving `alias` or on its way to: a copy."""
    if w.next_model == alias:
        return True
    return w.model == alias and w.state in (WorkerState.LOADING, WorkerState.READY)


class _Free:
    """Free MiB per device while a plan is made: a load takes, an eviction gives back."""

    def __init__(self, workers: list[Candidate], rooms: Mapping[str, Room]) -> None:
        self.mb: dict[str, int | None] = {}
        for w in workers:
            d = _device(w)
            room = rooms.get(w.device) if w.device else None
            if room is not None and room.budget_mb is not None:
                self.mb[d] = room.budget_mb - room.reserved_mb
            elif d not in self.mb:
                self.mb[d] = None if w.budget_mb is None else w.budget_mb - (w.held_mb or 0)

    def has(self, device: str, need: int | None, freed: int = 0) -> bool:
        free = self.mb.get(device)
        return need is None or free is None or free + freed >= need


def plan(
    alias: str,
    workers: list[Candidate],
    *,
    want: int = 1,
    now: float,
    waited: float = 0.0,
    policy: Policy | None = None,
    rooms: Mapping[str, Room] | None = None,
) -> Plan:
    """Where to load `alias` so that `want` copies are ready or loading."""
    policy = policy or Policy()
    rooms = rooms or {}
    ready = sum(w.model == alias and w.state is WorkerState.READY for w in workers)
    copies = sum(_holds(w, alias) for w in workers)
    if copies >= want:
        outcome = Outcome.SERVING if ready >= want else Outcome.LOADING
        return Plan(outcome, copies=copies)
    if not workers:  # starting up or a rolling restart: wait (bounded by load_timeout)
        return Plan(Outcome.WAIT, reason="no worker is running", copies=copies)
    could = [w for w in workers if _fits(w, rooms)]
    if not could:
        need = max(w.need_mb or 0 for w in workers)
        largest = max(_room_budget(w, rooms) or 0 for w in workers)
        reason = (
            f"model {alias!r} needs {need} MiB but the largest device budget is "
            f"{largest} MiB: no worker can ever hold it"
        )
        return Plan(
            Outcome.NO_CAPACITY,
            reason=reason,
            need_mb=need,
            largest_budget_mb=largest,
            copies=copies,
        )
    failed = [w for w in workers if alias in w.failed]
    if failed and copies == 0:
        where = failed[0]
        return Plan(Outcome.FAILED, reason=f"on {where.id}: {where.failed[alias]}", copies=copies)
    loads: list[Load] = []
    unloads: list[Unload] = []
    taken: set[str] = set()
    free = _Free(workers, rooms)
    for _ in range(want - copies):
        choice = _one(alias, could, taken, free, now=now, waited=waited, policy=policy)
        if choice is None:
            break
        loads.append(choice.load)
        unloads += choice.unloads
    if loads:
        return Plan(Outcome.LOAD, tuple(loads), tuple(unloads), copies=copies)
    if copies:
        return Plan(Outcome.LOADING, copies=copies)
    why = _why_wait(alias, could, free, now, waited, policy)
    return Plan(Outcome.WAIT, reason=why, copies=copies)


@dataclass(frozen=True)
class _Choice:
    load: Load
    unloads: tuple[Unload, ...]
    rank: tuple[float, ...]  # smaller is better


def _one(
    alias: str,
    could: list[Candidate],
    taken: set[str],
    free: _Free,
    *,
    now: float,
    waited: float,
    policy: Policy,
) -> _Choice | None:
    usable = [w for w in could if w.id not in taken and alias not in w.failed]
    choices = []
    for device in sorted({_device(w) for w in usable}):
        on = [w for w in usable if _device(w) == device]
        choice = _on_device(alias, device, on, free, now=now, waited=waited, policy=policy)
        if choice is not None:
            choices.append(choice)
    if not choices:
        return None
    best = min(choices, key=lambda c: c.rank)
    freed = 0
    for w in usable:
        if w.id == best.load.worker or any(u.worker == w.id for u in best.unloads):
            taken.add(w.id)
            if w.id != best.load.worker or best.load.evict:
                freed += w.held_mb or 0
    need = next(w.need_mb for w in usable if w.id == best.load.worker)
    device = next(_device(w) for w in usable if w.id == best.load.worker)
    if free.mb.get(device) is not None:
        free.mb[device] = (free.mb[device] or 0) + freed - (need or 0)
    return best


def _on_device(
    alias: str,
    device: str,
    on: list[Candidate],
    free: _Free,
    *,
    now: float,
    waited: float,
    policy: Policy,
) -> _Choice | None:
    """The best way to load `alias` on one device: on an empty worker if there is room,
    else after the fewest least-recently-used idle models leave."""
    empty = sorted((w for w in on if w.state is WorkerState.EMPTY), key=lambda w: w.id)
    need = (empty or on)[0].need_mb
    room = free.mb.get(device)
    if empty and free.has(device, need):
        spare = (room or 0) - (need or 0) if room is not None else 1 << 40
        return _Choice(Load(empty[0].id), (), (0, -spare if need is None else spare))
    victims = sorted(
        (w for w in on if _evictable(w, alias, now, waited, policy)),
        key=lambda w: (w.last_used or w.loaded_at or 0.0, w.id),
    )
    freed = 0
    for k, victim in enumerate(victims, start=1):
        freed += victim.held_mb or 0
        if need is None or free.has(device, need, freed) or victim.held_mb is None:
            chosen = victims[:k]
            if empty:
                load, rest = Load(empty[0].id), chosen
            else:
                load, rest = Load(chosen[0].id, evict=chosen[0].model), chosen[1:]
            unloads = tuple(Unload(w.id, w.model or "") for w in rest)
            return _Choice(load, unloads, (k, chosen[-1].last_used or 0.0))
    return None


def _evictable(w: Candidate, alias: str, now: float, waited: float, policy: Policy) -> bool:
    if w.state is not WorkerState.READY or w.model in (None, alias) or w.next_model:
        return False
    if w.pinned or w.busy:
        return False
    resident = now - (w.loaded_at or 0.0)
    return resident >= policy.min_residency or waited >= policy.max_swap_wait


def _why_wait(
    alias: str, could: list[Candidate], free: _Free, now: float, waited: float, policy: Policy
) -> str:
    parts = []
    for w in could:
        if alias in w.failed:
            why = "failed it"
        elif w.state is WorkerState.EMPTY:
            room = free.mb.get(_device(w))
            why = f"empty, but its device has {room} MiB free, needs {w.need_mb}"
        elif w.state is not WorkerState.READY:
            why = w.state.value
        elif w.pinned:
            why = f"{w.model} is pinned"
        elif w.busy:
            why = f"{w.model} is busy"
        else:
            why = f"{w.model} loaded {now - (w.loaded_at or now):.0f}s ago (min_residency)"
        parts.append(f"{w.id}: {why}")
    return "waiting for a worker: " + "; ".join(parts)


def plan_error(alias: str, plan: Plan) -> CorralError:
    """The client's error for a plan that cannot succeed."""
    if plan.outcome is Outcome.FAILED:
        return NoCapacity(
            f"The model {alias!r} failed {plan.reason}. Fix it, then "
            f"POST /v1/models/{alias}/reset.",
            code="model_failed",
            param="model",
        )
    return NoCapacity(f"No capacity: {plan.reason}.", param="model")


def plan_summary(plan: Plan) -> dict[str, Any]:
    return {
        "outcome": plan.outcome.value,
        "reason": plan.reason or None,
        "loads": [{"worker": ld.worker, "evict": ld.evict} for ld in plan.loads],
        "unloads": [{"worker": u.worker, "model": u.model} for u in plan.unloads],
        "copies": plan.copies,
    }

"""Placement: which worker loads a model that is not served enough. A pure function of the
workers' registry entries, so every rule is unit-tested on plain data; `gateway.placement.placer`
does the I/O (reading the registry, the lock, the commands).

For each copy still wanted, in this order:
1. a worker already loading it counts as a copy (ten cold requests cause one load);
2. an empty worker whose budget fits — the smallest such budget, so big workers stay free
   for big models (the largest when the need is not known yet);
3. a worker whose model is idle (nothing running or queued), unpinned, and either past
   `min_residency` or the newcomer has waited longer than `max_swap_wait` — least recently
   used first. A busy model is never evicted.
If no live worker's budget could ever hold the model, the answer is NO_CAPACITY with the
need and the largest budget; if it failed on a worker (until reset) and no copy is up, the
answer is FAILED, so requests get the reason at once instead of a load storm.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

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


@dataclass(frozen=True)
class Policy:
    min_residency: float = 30.0
    max_swap_wait: float = 10.0


@dataclass(frozen=True)
class Load:
    worker: str
    evict: str | None = None


@dataclass(frozen=True)
class Plan:
    outcome: Outcome
    loads: tuple[Load, ...] = ()
    reason: str = ""
    need_mb: int | None = None
    largest_budget_mb: int | None = None
    copies: int = 0  # copies ready or loading before this plan


def _fits(w: Candidate) -> bool:
    return w.need_mb is None or w.budget_mb is None or w.need_mb <= w.budget_mb


def _holds(w: Candidate, alias: str) -> bool:
    """Serving `alias` or on its way to: a copy."""
    if w.next_model == alias:
        return True
    return w.model == alias and w.state in (WorkerState.LOADING, WorkerState.READY)


def plan(
    alias: str,
    workers: list[Candidate],
    *,
    want: int = 1,
    now: float,
    waited: float = 0.0,
    policy: Policy | None = None,
) -> Plan:
    """Where to load `alias` so that `want` copies are ready or loading."""
    policy = policy or Policy()
    ready = sum(w.model == alias and w.state is WorkerState.READY for w in workers)
    copies = sum(_holds(w, alias) for w in workers)
    if copies >= want:
        outcome = Outcome.SERVING if ready >= want else Outcome.LOADING
        return Plan(outcome, copies=copies)
    if not workers:  # starting up or a rolling restart: wait (bounded by load_timeout)
        return Plan(Outcome.WAIT, reason="no worker is running", copies=copies)
    could = [w for w in workers if _fits(w)]
    if not could:
        need = max(w.need_mb or 0 for w in workers)
        largest = max(w.budget_mb or 0 for w in workers)
        reason = (
            f"model {alias!r} needs {need} MiB but the largest worker budget is "
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
    taken: set[str] = set()
    for _ in range(want - copies):
        load = _one(alias, could, taken, now=now, waited=waited, policy=policy)
        if load is None:
            break
        loads.append(load)
        taken.add(load.worker)
    if loads:
        return Plan(Outcome.LOAD, tuple(loads), copies=copies)
    if copies:
        return Plan(Outcome.LOADING, copies=copies)
    return Plan(Outcome.WAIT, reason=_why_wait(alias, could, now, waited, policy), copies=copies)


def _one(
    alias: str,
    could: list[Candidate],
    taken: set[str],
    *,
    now: float,
    waited: float,
    policy: Policy,
) -> Load | None:
    usable = [w for w in could if w.id not in taken and alias not in w.failed]
    empty = [w for w in usable if w.state is WorkerState.EMPTY]
    if empty:
        return Load(min(empty, key=_best_fit).id)
    victims = [w for w in usable if _evictable(w, alias, now, waited, policy)]
    if victims:
        lru = min(victims, key=lambda w: (w.last_used or w.loaded_at or 0.0, w.id))
        return Load(lru.id, evict=lru.model)
    return None


def _best_fit(w: Candidate) -> tuple[int, str]:
    """The smallest budget that fits a known need; the largest when the need is unknown."""
    budget = w.budget_mb if w.budget_mb is not None else 1 << 40
    return (budget if w.need_mb is not None else -budget, w.id)


def _evictable(w: Candidate, alias: str, now: float, waited: float, policy: Policy) -> bool:
    if w.state is not WorkerState.READY or w.model in (None, alias) or w.next_model:
        return False
    if w.pinned or w.busy:
        return False
    resident = now - (w.loaded_at or 0.0)
    return resident >= policy.min_residency or waited >= policy.max_swap_wait


def _why_wait(alias: str, could: list[Candidate], now: float, waited: float, policy: Policy) -> str:
    parts = []
    for w in could:
        if alias in w.failed:
            why = "failed it"
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
        "copies": plan.copies,
    }

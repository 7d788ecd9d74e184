"""Placement decisions on plain data (`gateway.placement.policy`): every rule."""

from __future__ import annotations

from typing import Any

from common.registry import WorkerState
from gateway.placement.policy import Candidate, Outcome, Plan, Policy, plan

NOW = 1_000_000.0
POLICY = Policy(min_residency=30, max_swap_wait=10)


def empty(wid: str, budget: int, need: int | None = 50, **kw: Any) -> Candidate:
    return Candidate(id=wid, state=WorkerState.EMPTY, budget_mb=budget, need_mb=need, **kw)


def holding(
    wid: str,
    model: str,
    budget: int = 100,
    need: int | None = 50,
    *,
    age: float = 60,
    used_ago: float = 60,
    **kw: Any,
) -> Candidate:
    return Candidate(
        id=wid,
        state=WorkerState.READY,
        budget_mb=budget,
        need_mb=need,
        model=model,
        loaded_at=NOW - age,
        last_used=NOW - used_ago,
        **kw,
    )


def decide(workers: list[Candidate], want: int = 1, waited: float = 0.0) -> Plan:
    return plan("m", workers, want=want, now=NOW, waited=waited, policy=POLICY)


def test_ready_copy_serves() -> None:
    p = decide([holding("w1", "m"), empty("w2", 100)])
    assert p.outcome is Outcome.SERVING and not p.loads


def test_a_worker_already_loading_it_is_waited_for() -> None:
    loading = Candidate(id="w1", state=WorkerState.LOADING, budget_mb=100, need_mb=50, model="m")
    swapping = Candidate(
        id="w2", state=WorkerState.UNLOADING, budget_mb=100, need_mb=50, model="x", next_model="m"
    )
    for w in (loading, swapping):
        p = decide([w, empty("w3", 100)])
        assert p.outcome is Outcome.LOADING and not p.loads


def test_empty_worker_with_the_smallest_fitting_budget() -> None:
    p = decide([empty("big", 1000), empty("small", 60), empty("tiny", 40)])
    assert p.outcome is Outcome.LOAD
    assert [(ld.worker, ld.evict) for ld in p.loads] == [("small", None)]


def test_empty_worker_preferred_over_eviction() -> None:
    p = decide([holding("w1", "x"), empty("w2", 100)])
    assert [(ld.worker, ld.evict) for ld in p.loads] == [("w2", None)]


def test_lru_idle_model_is_evicted() -> None:
    p = decide([holding("w1", "x", used_ago=10), holding("w2", "y", used_ago=100)])
    assert [(ld.worker, ld.evict) for ld in p.loads] == [("w2", "y")]


def test_pinned_and_busy_models_are_never_evicted() -> None:
    ws = [
        holding("w1", "x", pinned=True, used_ago=500),
        holding("w2", "y", busy=True, used_ago=400),
        holding("w3", "z", used_ago=5),
    ]
    assert [(ld.worker, ld.evict) for ld in decide(ws).loads] == [("w3", "z")]
    p = decide(ws[:2], waited=1000)
    assert p.outcome is Outcome.WAIT and not p.loads
    assert "pinned" in p.reason and "busy" in p.reason


def test_min_residency_holds_a_fresh_model_until_max_swap_wait() -> None:
    fresh = [holding("w1", "x", age=5, used_ago=5)]
    assert decide(fresh, waited=2).outcome is Outcome.WAIT
    assert "min_residency" in decide(fresh, waited=2).reason
    p = decide(fresh, waited=11)  # the newcomer waited longer than max_swap_wait
    assert [(ld.worker, ld.evict) for ld in p.loads] == [("w1", "x")]


def test_too_big_for_every_budget_is_no_capacity_with_need_and_largest_budget() -> None:
    p = decide([empty("w1", 100, need=300), holding("w2", "x", budget=150, need=300)])
    assert p.outcome is Outcome.NO_CAPACITY
    assert p.need_mb == 300 and p.largest_budget_mb == 150
    assert "300 MiB" in p.reason and "150 MiB" in p.reason


def test_a_worker_too_small_is_skipped() -> None:
    p = decide([empty("small", 40, need=80), empty("big", 100, need=80)])
    assert [ld.worker for ld in p.loads] == ["big"]


def test_no_workers_yet_is_a_wait_not_a_503() -> None:
    """Workers starting, or all restarting: the request waits (504 after load_timeout)."""
    p = decide([])
    assert p.outcome is Outcome.WAIT and "no worker" in p.reason


def test_unknown_need_goes_to_the_largest_budget() -> None:
    p = decide([empty("a", 100, need=None), empty("b", 50, need=None)])
    assert p.outcome is Outcome.LOAD and p.loads[0].worker == "a"


def test_failed_model_fails_fast_until_reset() -> None:
    ws = [empty("w1", 100, failed={"m": "load failed: bad magic"}), empty("w2", 100)]
    p = decide(ws)
    assert p.outcome is Outcome.FAILED and "bad magic" in p.reason
    # with a copy up, a replica goes elsewhere and skips the worker where it failed
    up = [holding("w0", "m"), *ws]
    p = decide(up, want=2)
    assert [ld.worker for ld in p.loads] == ["w2"]


def test_replicas_are_placed_on_distinct_workers() -> None:
    ws = [empty("w1", 100), empty("w2", 100), holding("w3", "x", used_ago=100), holding("w4", "m")]
    p = decide(ws, want=3)
    assert p.outcome is Outcome.LOAD and p.copies == 1
    assert sorted(ld.worker for ld in p.loads) == ["w1", "w2"]
    p = decide(ws, want=4)
    assert sorted((ld.worker, ld.evict) for ld in p.loads) == [
        ("w1", None),
        ("w2", None),
        ("w3", "x"),
    ]


def test_workers_in_transition_are_not_taken() -> None:
    ws = [
        Candidate(id="w1", state=WorkerState.STARTING, budget_mb=100, need_mb=50),
        Candidate(id="w2", state=WorkerState.LOADING, budget_mb=100, need_mb=50, model="x"),
    ]
    assert decide(ws).outcome is Outcome.WAIT

"""Placement decisions on plain data (`gateway.placement.policy`): every rule."""

from __future__ import annotations

import dataclasses
from typing import Any

from common.devices import Room
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


# -- workers sharing a device: memory is the device's -----------------------------------------
GPU = "gpu:GPU-1"


def room(budget: int, **reserved: int) -> dict[str, Room]:
    return {GPU: Room(budget, reserved)}


def on_gpu(c: Candidate, held: int | None = None) -> Candidate:
    return dataclasses.replace(c, device=GPU, held_mb=held)


def decide_on(workers: list[Candidate], rooms: dict[str, Room], waited: float = 0.0) -> Plan:
    return plan("m", workers, now=NOW, waited=waited, policy=POLICY, rooms=rooms)


def test_a_shared_device_with_room_takes_the_newcomer_beside_what_it_holds() -> None:
    ws = [
        on_gpu(holding("w1", "x"), 40),
        on_gpu(empty("w2", 100, need=40)),
        on_gpu(empty("w3", 100)),
    ]
    p = decide_on(ws, room(100, w1=40))
    assert [(ld.worker, ld.evict) for ld in p.loads] == [("w2", None)] and not p.unloads


def test_no_room_on_the_device_evicts_the_lru_model_and_loads_on_an_empty_worker() -> None:
    ws = [
        on_gpu(holding("w1", "x", need=60, used_ago=100), 50),
        on_gpu(holding("w2", "y", need=60, used_ago=10), 30),
        on_gpu(empty("w3", 100, need=60)),
    ]
    p = decide_on(ws, room(100, w1=50, w2=30))  # 20 free: x (the LRU) must go
    assert [(ld.worker, ld.evict) for ld in p.loads] == [("w3", None)]
    assert [(u.worker, u.model) for u in p.unloads] == [("w1", "x")]


def test_one_big_model_evicts_as_many_small_ones_as_it_needs() -> None:
    ws = [on_gpu(holding(f"w{i}", f"s{i}", need=90, used_ago=100 - i), 30) for i in range(3)]
    p = decide_on(ws, room(100, w0=30, w1=30, w2=30))  # 10 free, 90 needed: all three go
    assert [(ld.worker, ld.evict) for ld in p.loads] == [("w0", "s0")]
    assert sorted(u.model for u in p.unloads) == ["s1", "s2"]


def test_a_busy_neighbour_is_never_evicted_so_the_newcomer_waits() -> None:
    ws = [
        on_gpu(holding("w1", "x", need=80, busy=True), 60),
        on_gpu(empty("w2", 100, need=80)),
    ]
    p = decide_on(ws, room(100, w1=60))
    assert p.outcome is Outcome.WAIT and "busy" in p.reason


def test_the_device_budget_bounds_what_can_ever_fit() -> None:
    p = decide_on([on_gpu(empty("w1", 1000, need=150))], room(100))
    assert p.outcome is Outcome.NO_CAPACITY and p.largest_budget_mb == 100


def test_two_devices_the_one_with_room_is_chosen_without_eviction() -> None:
    other = "gpu:GPU-2"
    ws = [
        on_gpu(holding("a1", "x", need=50), 80),
        on_gpu(empty("a2", 100, need=50)),
        dataclasses.replace(empty("b1", 100, need=50), device=other),
    ]
    p = decide_on(ws, {GPU: Room(100, {"a1": 80}), other: Room(100, {})})
    assert [(ld.worker, ld.evict) for ld in p.loads] == [("b1", None)] and not p.unloads

"""Prefix affinity on real parts: two replicas of one model (a worker and a llama-server
each, one slot each), a gateway, the official `openai` client. A conversation's turns
land on one replica while it is free; a turn whose replica is busy past `affinity_wait`
spills to the other; a turn whose replica was killed is served by the other; a high
request still overtakes queued low ones; a turn waiting for a replica that drains goes to
the other at once."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from common import redis_keys
from common.priority import Priority
from common.registry import WorkerInfo
from gateway.placement.placer import ENSURE_VIEW_MAX_AGE_S
from tests.conftest import Cluster, configured_cluster
from tests.gateway.helpers import samples, value
from tests.support import Blocker, busy_slots, slow_model, wait_for, workers

pytestmark = pytest.mark.slow  # runs Corral processes

MODEL = "aff"
WAIT_S = 1.0  # the model's affinity_wait


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("affinity")
    config = {
        "models": {
            MODEL: {
                "model_path": str(slow_model(root / "aff.gguf")),  # a Blocker lasts
                "ctx_size": 16384,
                "parallel": 1,
                "affinity_wait": WAIT_S,
            }
        }
    }
    worker = ["--model", MODEL]
    with configured_cluster(root, config, [worker, worker]) as cluster:
        time.sleep(ENSURE_VIEW_MAX_AGE_S + 0.5)  # the gateway's view has both replicas
        yield cluster


def record(cluster: Cluster, request_id: str) -> dict[str, Any]:
    r = httpx.get(f"{cluster.base_url}/v1/requests/{request_id}")
    assert r.status_code == 200, r.text
    return dict(r.json())


def chat(
    cluster: Cluster,
    messages: list[dict[str, str]],
    key: str | None = None,
    priority: str = "normal",
) -> tuple[Any, str]:
    """One whole reply through the openai client (`key`: its `prompt_cache_key`): the
    reply, and its request id."""
    raw = cluster.client(timeout=60).chat.completions.with_raw_response.create(
        model=MODEL,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=8,
        extra_body={"prompt_cache_key": key} if key else None,
        extra_headers={"X-Request-Priority": priority},
    )
    return raw.parse(), raw.headers["x-request-id"]


def replicas(cluster: Cluster) -> dict[str, WorkerInfo]:
    return {w.id: w for w in workers(cluster.redis_url, MODEL)}


def test_turns_of_a_conversation_land_on_the_replica_that_served_it(pair: Cluster) -> None:
    placed: dict[int, set[str]] = {}
    for conv in range(3):
        messages = [
            {"role": "system", "content": f"Conversation {conv}. " + "Be brief. " * 150},
            {"role": "user", "content": "Hello."},
        ]
        for turn in range(3):
            reply, request_id = chat(pair, messages)
            rec = record(pair, request_id)
            placed.setdefault(conv, set()).add(rec["worker"])
            if turn:
                assert rec["affinity"] == "hit" and rec["affinity_worker"] == rec["worker"], rec
                cached = reply.usage.prompt_tokens_details.cached_tokens
                assert cached and cached > 300, reply.usage  # llama-server's count, passed on
                assert rec["cached_tokens"] == cached
            messages += [
                {"role": "assistant", "content": reply.choices[0].message.content or "."},
                {"role": "user", "content": f"And turn {turn + 2}?"},
            ]
    assert all(len(w) == 1 for w in placed.values()), placed
    counted = samples(httpx.get(f"{pair.base_url}/metrics").text)
    assert value(counted, "corral_affinity_total", model=MODEL, result="hit") >= 6


def test_a_turn_whose_replica_is_busy_spills_to_the_other(pair: Cluster) -> None:
    both = replicas(pair)
    assert len(both) == 2
    with Blocker(pair.base_url, MODEL, prompt_cache_key="spill-conv") as blocker:
        held = record(pair, blocker.request_id)
        busy = held["worker"]
        assert wait_for(lambda: busy_slots(str(both[busy].upstream)) == 1, 20)
        began = time.monotonic()
        reply, request_id = chat(pair, [{"role": "user", "content": "hi"}], "spill-conv")
        waited = time.monotonic() - began
        rec = record(pair, request_id)
        assert reply.choices and rec["state"] == "done"
        assert rec["affinity"] == "spill" and rec["affinity_worker"] == busy, rec
        assert rec["worker"] != busy and rec["worker"] in both
        assert waited >= WAIT_S * 0.9  # it waited its bound for the busy replica first
    counted = samples(httpx.get(f"{pair.base_url}/metrics").text)
    assert value(counted, "corral_affinity_total", model=MODEL, result="spill") >= 1


def test_a_high_request_still_overtakes_queued_low_ones(pair: Cluster) -> None:
    both = replicas(pair)
    messages = [{"role": "user", "content": "queued"}]
    _, ran = chat(pair, messages, "one-conv")  # its replica: where the rest is sent
    home = record(pair, ran)["worker"]
    with ThreadPoolExecutor(4) as pool:

        def send(priority: str) -> Future[tuple[Any, str]]:
            return pool.submit(chat, pair, messages, "one-conv", priority)

        with (
            Blocker(pair.base_url, MODEL, prompt_cache_key="block-a"),
            Blocker(pair.base_url, MODEL, prompt_cache_key="block-b"),
        ):
            # the second blocker spills to the replica the first one leaves free
            assert wait_for(
                lambda: all(busy_slots(str(w.upstream)) == 1 for w in both.values()), 20
            ), pair.logs()
            lows = [send("low") for _ in range(3)]
            time.sleep(0.2)
            high = send("high")
            time.sleep(0.2)
        # the blockers are cancelled: each replica takes what it holds, high first
        started = {f: record(pair, f.result(60)[1]) for f in [*lows, high]}
    top = started[high]
    assert top["affinity"] in ("hit", "spill") and top["affinity_worker"] == home, top
    same = [r for f, r in started.items() if f is not high and r["worker"] == top["worker"]]
    assert same, started  # the key's replica held low requests too
    assert all(top["started_at"] < r["started_at"] for r in same), (top, same)


def test_a_turn_whose_replica_was_killed_is_served_by_the_other(pair: Cluster) -> None:
    messages = [{"role": "user", "content": "Remember me."}]
    _, first = chat(pair, messages, "doomed")
    victim = record(pair, first)["worker"]
    info = replicas(pair)[victim]
    os.killpg(info.pid, signal.SIGKILL)  # the worker, its pool and its llama-server
    reply, request_id = chat(pair, messages, "doomed")
    rec = record(pair, request_id)
    assert reply.choices and rec["state"] == "done"
    assert rec["worker"] != victim, rec


def test_a_draining_replica_gives_its_waiting_turns_to_the_other(tmp_path: Path) -> None:
    """A turn waiting in the queue of a replica that is stopping (SIGTERM: a rolling
    upgrade, `corral drain`) goes to the other replica at once, not after `affinity_wait`
    (30 s here: a spill would show in the record)."""
    model = slow_model(tmp_path / "aff.gguf")
    config = {
        "models": {
            MODEL: {"model_path": str(model), "ctx_size": 16384, "parallel": 1, "affinity_wait": 30}
        }
    }
    worker = ["--model", MODEL]
    with configured_cluster(tmp_path, config, [worker, worker]) as cluster:
        time.sleep(ENSURE_VIEW_MAX_AGE_S + 0.5)  # the gateway's view has both replicas
        both = replicas(cluster)
        with Blocker(cluster.base_url, MODEL, prompt_cache_key="drained") as blocker:
            busy = record(cluster, blocker.request_id)["worker"]
            assert wait_for(lambda: busy_slots(str(both[busy].upstream)) == 1, 20)
            with ThreadPoolExecutor(1) as pool:
                turn = pool.submit(chat, cluster, [{"role": "user", "content": "hi"}], "drained")
                assert wait_for(lambda: _waiting_for(cluster, busy) == 1, 10), cluster.logs()
                os.kill(both[busy].pid, signal.SIGTERM)  # drains: the blocker may finish
                reply, request_id = turn.result(20)
        rec = record(cluster, request_id)
        assert reply.choices and rec["state"] == "done"
        assert rec["worker"] != busy and rec["affinity"] == "hit", rec


def _waiting_for(cluster: Cluster, worker: str) -> int:
    """Requests in `worker`'s affinity queue of MODEL (normal priority)."""
    client = redis.Redis.from_url(cluster.redis_url)
    try:
        return int(client.llen(redis_keys.affinity_queue(MODEL, Priority.NORMAL, worker)))
    finally:
        client.close()

"""kill -9 of a worker mid-stream: its clients hear about it within seconds, a
non-streaming request runs again elsewhere (once), queued work goes to another worker."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import redis

from common import redis_keys
from common.registry import WorkerInfo
from corral.redis_server import EmbeddedRedis
from tests.conftest import Cluster, start_cluster
from tests.support import (
    Call,
    alive,
    busy_slots,
    slow_model,
    wait_for,
    workers,
)

pytestmark = pytest.mark.slow  # every test here runs Corral processes

MODEL = "d-chat"
HI = [{"role": "user", "content": "hi"}]


def _no_tasks_left(redis_url: str) -> None:
    """Each test's cluster starts with empty queues: one test's leftovers (a killed task's
    copy, a resubmission) would otherwise be served first by the next test's worker."""
    client = redis.Redis.from_url(redis_url)
    try:
        client.delete(*redis_keys.model_queues(MODEL))
    finally:
        client.close()


@pytest.fixture
def two_workers(redis_server: EmbeddedRedis, tmp_path: Path) -> Iterator[tuple[Cluster, Path]]:
    _no_tasks_left(redis_server.url)
    # The long requests must still be running on A when B has started and A is killed.
    model = slow_model(tmp_path / f"{MODEL}.gguf")
    cluster = start_cluster(
        redis_server.url,
        tmp_path / "logs",
        [["--model", str(model), "--slots", "2", "--ctx-size", "16384"]],
    )
    yield cluster, model
    cluster.stop()


def _record(cluster: Cluster, request_id: str) -> dict[str, Any]:
    data: dict[str, Any] = httpx.get(f"{cluster.base_url}/v1/requests/{request_id}").json()
    return data


def _running_on(cluster: Cluster, worker_id: str) -> int:
    (info,) = [w for w in workers(cluster.redis_url, MODEL) if w.id == worker_id]
    assert info.upstream
    return busy_slots(info.upstream)


def test_kill_9_worker_mid_stream(two_workers: tuple[Cluster, Path], tmp_path: Path) -> None:
    cluster, model = two_workers
    (a,) = workers(cluster.redis_url, MODEL)
    a_child = cluster.children[1]
    # A (2 slots) takes a stream and a non-streaming request
    stream_a = Call(cluster.base_url, MODEL, stream=True, max_tokens=8000)
    plain_a = Call(cluster.base_url, MODEL, stream=False, max_tokens=1500)
    assert wait_for(lambda: _running_on(cluster, a.id) == 2, 20)
    # B (1 slot) joins and takes one more stream; then a short request must queue
    cluster.add_worker(
        "worker-b",
        ["--model", str(model), "--slots", "1", "--ctx-size", "16384"],
        tmp_path / "b.log",
    )
    assert wait_for(lambda: len(_ready(cluster)) == 2, 60, 0.1)
    (b,) = [w for w in workers(cluster.redis_url, MODEL) if w.id != a.id]
    stream_b = Call(cluster.base_url, MODEL, stream=True, max_tokens=8000)
    assert wait_for(lambda: _running_on(cluster, b.id) == 1, 20)
    queued = Call(cluster.base_url, MODEL, stream=False, max_tokens=4)
    assert wait_for(lambda: _depth(cluster) == 1, 10, 0.05)

    a_llama = _llama_children(a_child.pid)
    assert a_child.pid is not None
    os.kill(a_child.pid, signal.SIGKILL)
    killed = time.monotonic()

    stream_a.join(10)
    assert stream_a.ended_at and stream_a.ended_at - killed < 5.0, cluster.logs()
    assert stream_a.status == 200
    assert '"worker_lost"' in stream_a.lines[-2] and stream_a.lines[-1] == "data: [DONE]"
    # its record says so (it said "running" until kombu redelivered the task, half an hour)
    record = _record(cluster, stream_a.request_id)
    assert record["state"] == "failed" and record["error"], record
    # A's llama-server died with it (PR_SET_PDEATHSIG)
    assert wait_for(lambda: not any(alive(p) for p in a_llama), 5)

    # free B: the queued request, then the non-streaming one A lost, run there
    httpx.post(f"{cluster.base_url}/v1/requests/{stream_b.request_id}/cancel")
    queued.join(30)
    plain_a.join(30)
    assert queued.status == 200 and queued.result["choices"], queued.result
    assert plain_a.status == 200, plain_a.result
    assert plain_a.result["usage"]["completion_tokens"] == 1500
    assert _record(cluster, plain_a.request_id)["worker"] == b.id
    assert _record(cluster, queued.request_id)["worker"] == b.id
    assert not [w for w in workers(cluster.redis_url) if w.id == a.id]


def _ready(cluster: Cluster) -> list[str]:
    return [w.id for w in workers(cluster.redis_url, MODEL) if w.state == "ready"]


def _depth(cluster: Cluster) -> int:
    stats = httpx.get(f"{cluster.base_url}/v1/queue/stats").json()["models"][MODEL]
    return sum(int(p["depth"]) for p in stats["priorities"].values())


def _llama_children(pid: int | None) -> list[int]:
    assert pid is not None
    return [
        p.pid for p in psutil.Process(pid).children(recursive=True) if "llama-server" in p.name()
    ]


@pytest.fixture
def one_slot(redis_server: EmbeddedRedis, tmp_path: Path) -> Iterator[Cluster]:
    _no_tasks_left(redis_server.url)
    model = slow_model(tmp_path / f"{MODEL}.gguf")
    args = ["--model", str(model), "--slots", "1", "--ctx-size", "16384"]
    cluster = start_cluster(redis_server.url, tmp_path / "logs", [args])
    yield cluster
    cluster.stop()


def test_pool_child_killed_mid_stream(one_slot: Cluster) -> None:
    """The worker lives on but the pool child running a stream dies (the kernel's OOM
    killer, say): Celery queues the task again, the worker's own copy is recognised as
    lost (not as a duplicate of a live worker's run), and the client hears `worker_lost`
    within seconds instead of waiting for its deadline; the next request is served."""
    cluster = one_slot
    stream = Call(cluster.base_url, MODEL, stream=True, max_tokens=8000)
    killed = _kill_pool_child_running(cluster, stream)

    # Celery finds the dead child on its pool's 5 s maintenance timer; on a busy machine
    # the copy's round trip adds a few seconds (the deadline it used to wait for: 600 s).
    stream.join(40)
    assert stream.ended_at and stream.ended_at - killed < 20.0, cluster.logs()
    assert '"worker_lost"' in stream.lines[-2], (stream.lines[-3:], cluster.logs())
    assert stream.lines[-1] == "data: [DONE]"
    after = Call(cluster.base_url, MODEL, stream=False, max_tokens=4)
    after.join(30)
    assert after.status == 200 and after.result["choices"], after.result


@pytest.fixture
def two_single_slots(redis_server: EmbeddedRedis, tmp_path: Path) -> Iterator[Cluster]:
    _no_tasks_left(redis_server.url)
    model = slow_model(tmp_path / f"{MODEL}.gguf")
    args = ["--model", str(model), "--slots", "1", "--ctx-size", "16384"]
    cluster = start_cluster(redis_server.url, tmp_path / "logs", [args, args])
    yield cluster
    cluster.stop()


def _kill_pool_child_running(cluster: Cluster, stream: Call) -> float:
    """SIGKILL the pool child running `stream` (found by its record, not by a busy slot,
    which another task could hold); when it was killed."""
    assert wait_for(lambda: bool(stream.request_id), 20), "the stream never started"
    assert wait_for(lambda: _record(cluster, stream.request_id)["state"] == "running", 20)
    (worker,) = [
        w
        for w in workers(cluster.redis_url, MODEL)
        if w.id == _record(cluster, stream.request_id)["worker"]
    ]
    assert wait_for(lambda: _running_on(cluster, worker.id) == 1, 20)
    (pool,) = [p for p in psutil.Process(worker.pid).children() if "llama-server" not in p.name()]
    os.kill(pool.pid, signal.SIGKILL)
    return time.monotonic()


def _kill_the_busy_pool_child(cluster: Cluster) -> float:
    """SIGKILL the pool child of whichever worker is generating; when it was killed."""

    def busy() -> list[WorkerInfo]:
        return [w for w in workers(cluster.redis_url, MODEL) if _running_on(cluster, w.id)]

    assert wait_for(lambda: len(busy()) == 1, 20)
    (worker,) = busy()
    (pool,) = [p for p in psutil.Process(worker.pid).children() if "llama-server" not in p.name()]
    os.kill(pool.pid, signal.SIGKILL)
    return time.monotonic()


def test_pool_child_killed_with_another_replica_up(two_single_slots: Cluster) -> None:
    """Celery queues the task again and the idle replica takes the copy: the claim names a
    live worker, yet the copy is settled as lost (its main process marked it): a stream's
    client hears `worker_lost` within seconds, a non-streaming request runs once more
    there and gets its answer."""
    cluster = two_single_slots
    stream = Call(cluster.base_url, MODEL, stream=True, max_tokens=8000)
    killed = _kill_pool_child_running(cluster, stream)
    stream.join(40)  # as above: the pool's 5 s timer, then the copy on the other replica
    assert stream.ended_at and stream.ended_at - killed < 20.0, cluster.logs()
    assert '"worker_lost"' in stream.lines[-2], (stream.lines[-3:], cluster.logs())
    assert stream.lines[-1] == "data: [DONE]"

    plain = Call(cluster.base_url, MODEL, stream=False, max_tokens=1500)
    _kill_the_busy_pool_child(cluster)
    plain.join(60)
    assert plain.status == 200, plain.result
    assert plain.result["usage"]["completion_tokens"] == 1500


def test_a_non_streaming_client_leaving_frees_the_slot_at_once(one_slot: Cluster) -> None:
    """The worker streams from llama-server even for a whole reply, so a client that
    leaves (and a cancel, a time limit) stops the generation at once: llama-server went
    on generating a non-streaming request to its end whatever happened to its socket."""
    cluster = one_slot
    (worker,) = workers(cluster.redis_url, MODEL)
    assert worker.upstream
    body = {"model": MODEL, "messages": HI, "max_tokens": 8000, "ignore_eos": True}
    with httpx.Client(timeout=30) as http:
        sent = threading.Thread(
            target=lambda: _leave_after(http, f"{cluster.base_url}/v1/chat/completions", body),
            daemon=True,
        )
        sent.start()
        assert wait_for(lambda: busy_slots(str(worker.upstream)) == 1, 20)
        sent.join(10)
    left = time.monotonic()
    assert wait_for(lambda: busy_slots(str(worker.upstream)) == 0, 1.0), cluster.logs()
    print(f"slot freed {1000 * (time.monotonic() - left):.0f} ms after the client left")


def _leave_after(http: httpx.Client, url: str, body: dict[str, Any]) -> None:
    """Send a non-streaming request and hang up a second later, unanswered."""
    with contextlib.suppress(httpx.TimeoutException):
        http.post(url, json=body, timeout=1.0)


def test_a_llama_server_crash_under_a_non_streaming_request_reruns_it(one_slot: Cluster) -> None:
    """Its llama-server killed mid-request, the worker restarts it and the request runs
    once more there (nothing had been sent to the client): it gets its whole answer."""
    cluster = one_slot
    plain = Call(cluster.base_url, MODEL, stream=False, max_tokens=1500)
    (worker,) = workers(cluster.redis_url, MODEL)
    assert wait_for(lambda: bool(plain.request_id) or _running_on(cluster, worker.id) == 1, 20)
    assert wait_for(lambda: _running_on(cluster, worker.id) == 1, 20)
    (llama,) = [p for p in psutil.Process(worker.pid).children() if "llama-server" in p.name()]
    os.kill(llama.pid, signal.SIGKILL)
    plain.join(60)
    assert plain.status == 200, (plain.result, cluster.logs())
    assert plain.result["usage"]["completion_tokens"] == 1500
    assert _record(cluster, plain.request_id)["state"] == "done"

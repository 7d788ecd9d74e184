"""Stopping a gateway or a worker with requests in flight (SIGTERM, as a rolling upgrade or
Kubernetes does): what can finish within `drain_timeout` finishes; what cannot ends with a
clear OpenAI error (a stream's error event, a 503 to retry) or, for a whole reply a worker
gave up, runs again on another worker. Never a plain-text 500, never a hang."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from corral.redis_server import EmbeddedRedis
from tests.conftest import Cluster, start_cluster
from tests.gateway.test_worker_death import MODEL, _no_tasks_left, _record, _running_on
from tests.support import Call, alive, busy_slots, slow_model, wait_for, workers

pytestmark = pytest.mark.slow  # every test here runs Corral processes

DRAIN_S = 2.0


@pytest.fixture
def drained(redis_server: EmbeddedRedis, tmp_path: Path) -> Iterator[tuple[Cluster, Path]]:
    _no_tasks_left(redis_server.url)
    model = slow_model(tmp_path / f"{MODEL}.gguf")
    args = ["--model", str(model), "--slots", "3", "--ctx-size", "24576"]
    cluster = start_cluster(
        redis_server.url, tmp_path / "logs", [args], CORRAL_DRAIN_TIMEOUT=str(DRAIN_S)
    )
    yield cluster, model
    cluster.stop()


def test_a_stopping_gateway_finishes_what_it_can_and_ends_the_rest_clearly(
    drained: tuple[Cluster, Path],
) -> None:
    cluster, _ = drained
    (worker,) = workers(cluster.redis_url, MODEL)
    stream = Call(cluster.base_url, MODEL, stream=True, max_tokens=8000)
    whole = Call(cluster.base_url, MODEL, stream=False, max_tokens=8000)
    assert wait_for(lambda: _running_on(cluster, worker.id) == 2, 20)
    short = Call(cluster.base_url, MODEL, stream=False, max_tokens=24)  # done within the drain
    gateway = cluster.children[0]
    assert gateway.pid is not None
    time.sleep(0.2)
    gateway.send_signal(signal.SIGTERM)
    stopped = time.monotonic()
    for call in (short, stream, whole):
        call.join(DRAIN_S + 10)
    assert short.status == 200 and short.result["usage"]["completion_tokens"] == 24
    assert stream.status == 200 and stream.lines[-1] == "data: [DONE]"
    event = json.loads(stream.lines[-2].removeprefix("data: "))
    assert event["error"]["code"] == "gateway_shutting_down", event
    assert whole.status == 503, whole.result
    assert whole.result["error"]["code"] == "gateway_shutting_down"
    assert stream.ended_at - stopped < DRAIN_S + 3 and whole.ended_at - stopped < DRAIN_S + 3
    assert wait_for(lambda: gateway.poll() is not None, 10)
    log = (cluster.log_dir / "gateway.log").read_text()
    assert "Traceback" not in log and "Internal Server Error" not in log
    assert str(worker.upstream)
    assert wait_for(lambda: busy_slots(str(worker.upstream)) == 0, 5)  # the worker stopped too


def test_a_stopping_worker_hands_a_whole_reply_to_another_and_tells_a_stream(
    drained: tuple[Cluster, Path], tmp_path: Path
) -> None:
    cluster, model = drained
    (a,) = workers(cluster.redis_url, MODEL)
    stream = Call(cluster.base_url, MODEL, stream=True, max_tokens=16000)
    whole = Call(cluster.base_url, MODEL, stream=False, max_tokens=3000)
    assert wait_for(lambda: _running_on(cluster, a.id) == 2, 20)
    cluster.add_worker(
        "worker-b",
        ["--model", str(model), "--slots", "1", "--ctx-size", "8192"],
        tmp_path / "b.log",
    )
    assert wait_for(lambda: len([w for w in workers(cluster.redis_url, MODEL)]) == 2, 60, 0.1)
    assert wait_for(
        lambda: all(w.state == "ready" for w in workers(cluster.redis_url, MODEL)), 60, 0.1
    )
    (b,) = [w for w in workers(cluster.redis_url, MODEL) if w.id != a.id]
    llama = [p.pid for p in psutil.Process(a.pid).children() if "llama-server" in p.name()]
    cluster.children[1].send_signal(signal.SIGTERM)
    stopped = time.monotonic()
    # it says so at once: no placement, no new task for it
    assert wait_for(
        lambda: [w.state for w in workers(cluster.redis_url) if w.id == a.id] == ["stopping"], 5
    )
    stream.join(DRAIN_S + 15)
    assert stream.ended_at - stopped < DRAIN_S + 10, cluster.logs()
    event = json.loads(stream.lines[-2].removeprefix("data: "))
    assert event["error"]["code"] == "worker_lost" and stream.lines[-1] == "data: [DONE]"
    whole.join(60)
    assert whole.status == 200, (whole.result, cluster.logs())
    assert whole.result["usage"]["completion_tokens"] == 3000
    assert _record(cluster, whole.request_id)["worker"] == b.id
    assert wait_for(lambda: not any(alive(p) for p in llama), 20)  # stopped with its worker

"""`corral drain` (a worker pod's preStop hook) on real parts: the worker stops taking
tasks but finishes the stream it runs, a request sent meanwhile stays queued for another
worker, and the SIGTERM that follows ends the idle worker at once."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from corral.redis_server import EmbeddedRedis
from tests.conftest import Cluster, start_cluster
from tests.support import Call, busy_slots, slow_model, wait_for, workers

pytestmark = pytest.mark.slow  # runs Corral processes

MODEL = "d-drain"


@pytest.fixture
def drained(redis_server: EmbeddedRedis, tmp_path: Path) -> Iterator[tuple[Cluster, Path]]:
    model = slow_model(tmp_path / f"{MODEL}.gguf")
    args = ["--model", str(model), "--slots", "1", "--ctx-size", "16384"]
    cluster = start_cluster(redis_server.url, tmp_path / "logs", [args])
    yield cluster, model
    cluster.stop()


def _depth(cluster: Cluster) -> int:
    stats = httpx.get(f"{cluster.base_url}/v1/queue/stats").json()["models"][MODEL]
    return sum(int(p["depth"]) for p in stats["priorities"].values())


def test_drain_finishes_running_work_and_leaves_the_queue_to_others(
    drained: tuple[Cluster, Path], tmp_path: Path
) -> None:
    cluster, model = drained
    (worker,) = workers(cluster.redis_url, MODEL)
    assert worker.upstream
    long = Call(
        cluster.base_url, MODEL, stream=True, max_tokens=6000
    )  # ~10 s here: outlasts the drain's checks
    assert wait_for(lambda: busy_slots(str(worker.upstream)) == 1, 20), cluster.logs()

    drain = subprocess.Popen(
        [sys.executable, "-m", "corral", "drain", "--timeout", "120"],
        stdout=subprocess.PIPE,
        text=True,
        env={"CORRAL_REDIS_URL": cluster.redis_url, "PATH": "/usr/bin:/bin"},
    )
    assert drain.stdout is not None
    first = drain.stdout.readline()
    assert "take no new tasks" in first and worker.id in first, first
    assert not long.ended_at, "the drain returned the stream's task, or cut it"

    short = Call(cluster.base_url, MODEL, stream=False, max_tokens=4)
    assert wait_for(lambda: _depth(cluster) == 1, 10), cluster.logs()
    time.sleep(2.5)  # two BRPOP cycles: a consumer still listening would have taken it
    assert _depth(cluster) == 1 and not short.ended_at

    rc = drain.wait(150)
    drained_at = time.monotonic()
    rest = drain.stdout.read()
    drain.stdout.close()
    assert rc == 0 and "idle" in rest, rest
    long.join(5)
    assert long.status == 200 and long.ended_at <= drained_at
    events = [line.removeprefix("data: ") for line in long.lines]
    assert events[-1] == "[DONE]" and not any("error" in json.loads(e) for e in events[:-1])

    stopping = time.monotonic()
    cluster.children[1].stop(grace=30)  # SIGTERM: nothing left to wait for
    assert time.monotonic() - stopping < 10, cluster.logs()
    assert _depth(cluster) == 1 and not short.ended_at

    cluster.add_worker(
        "worker-b",
        ["--model", str(model), "--slots", "1", "--ctx-size", "16384"],
        tmp_path / "b.log",
    )
    short.join(60)
    assert short.status == 200 and short.result["choices"], short.result

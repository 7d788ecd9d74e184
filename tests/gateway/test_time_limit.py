"""A request that runs past the worker's task time limit ends with a `task_time_limit`
error at the soft limit, streaming or not, and its llama-server slot is freed; without
the soft limit Celery's hard limit killed the pool child and the client heard nothing
until its deadline (up to `max_request_timeout`, an hour by default)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.celery_config import soft_time_limit
from corral.redis_server import EmbeddedRedis
from tests.conftest import Cluster, start_cluster
from tests.gateway.test_worker_death import Call
from tests.support import busy_slots, slow_model, wait_for, workers

MODEL = "t-chat"  # its own: another module's leftover tasks must not reach this worker
LIMIT_S = 4.0


@pytest.fixture
def limited(redis_server: EmbeddedRedis, tmp_path: Path) -> Iterator[Cluster]:
    model = slow_model(tmp_path / f"{MODEL}.gguf")
    args = ["--model", str(model), "--slots", "2", "--ctx-size", "32768"]
    cluster = start_cluster(
        redis_server.url, tmp_path / "logs", [args], CORRAL_TASK_TIME_LIMIT=str(LIMIT_S)
    )
    yield cluster
    cluster.stop()


def test_a_request_past_the_time_limit_ends_with_an_error(limited: Cluster) -> None:
    cluster = limited
    (worker,) = workers(cluster.redis_url, MODEL)
    upstream = worker.upstream
    assert upstream
    started = time.monotonic()
    stream = Call(cluster.base_url, stream=True, max_tokens=16000, model=MODEL)
    plain = Call(cluster.base_url, stream=False, max_tokens=16000, model=MODEL)
    stream.join(30)
    plain.join(30)
    soft = soft_time_limit(LIMIT_S)
    assert stream.ended_at and soft <= stream.ended_at - started < LIMIT_S + 5, cluster.logs()
    assert stream.status == 200
    assert '"task_time_limit"' in stream.lines[-2] and stream.lines[-1] == "data: [DONE]"
    assert plain.status == 504, plain.result
    assert plain.result["error"]["code"] == "task_time_limit"
    # Both calls were cut: the stream's slot frees at once. The other's does not: this
    # llama-server build goes on with a non-streaming generation whose client left, to its
    # end (README, "Requests and queues").
    assert wait_for(lambda: busy_slots(upstream) <= 1, 5), "the stream's slot was not freed"
    # the pool children live on
    after = Call(cluster.base_url, stream=False, max_tokens=4, model=MODEL)
    after.join(30)
    assert after.status == 200 and after.result["choices"], after.result
    assert "Hard time limit" not in cluster.logs()

"""The broker killed and started again (kill -9 of Valkey, append-only file on), under load:
the gateway and the worker reconnect by themselves, the queued requests survive and are
served, a stream that was running ends with one clear error event, `/health` says 503
while the broker is away and 200 within 10 s of its return, and nothing hangs. And the
broker's connections cut while the cluster idles (an idle timeout, a proxy, a failover):
the next requests are served. And a queued request the broker lost (a failover to a replica
the enqueue had not reached yet) is queued again by its gateway once it reconnects."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import redis

from common import redis_keys
from corral.redis_server import EmbeddedRedis
from corral.tinymodel import make_model
from tests.conftest import Cluster, start_cluster
from tests.support import Blocker, Call, slow_model, wait_for, workers

pytestmark = pytest.mark.slow  # every test here runs Corral processes

MODEL = "r-chat"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[tuple[EmbeddedRedis, Path]]:
    data = tmp_path / "valkey"
    server = EmbeddedRedis(data).start()
    yield server, data
    server.stop()


def _health(base: str) -> int:
    try:
        return httpx.get(f"{base}/health", timeout=2).status_code
    except httpx.HTTPError:
        return 0


def test_a_broker_restart_loses_nothing_and_hangs_nothing(
    broker: tuple[EmbeddedRedis, Path], tmp_path: Path
) -> None:
    server, data = broker
    model = slow_model(tmp_path / f"{MODEL}.gguf")
    args = ["--model", str(model), "--slots", "1", "--ctx-size", "16384"]
    cluster = start_cluster(server.url, tmp_path / "logs", [args])
    try:
        _run(cluster, server, data)
    finally:
        cluster.stop()


def _run(cluster: Cluster, server: EmbeddedRedis, data: Path) -> None:
    (worker,) = workers(cluster.redis_url, MODEL)
    stream = Call(cluster.base_url, stream=True, max_tokens=16000, model=MODEL)
    assert wait_for(lambda: stream.status == 200, 20)  # streaming (its headers came)
    queued = [Call(cluster.base_url, stream=False, max_tokens=8, model=MODEL) for _ in range(3)]
    time.sleep(0.5)  # enqueued behind the stream (one slot)
    server._child.send_signal(signal.SIGKILL)
    server._child.proc.wait()  # type: ignore[union-attr]
    killed = time.monotonic()
    assert wait_for(lambda: _health(cluster.base_url) == 503, 10), "health never said 503"
    time.sleep(2)  # away a while
    again = EmbeddedRedis(data, port=server.port).start()
    back = time.monotonic()
    try:
        assert wait_for(lambda: _health(cluster.base_url) == 200, 10), cluster.logs()
        print(f"health 200 again {time.monotonic() - back:.1f} s after the broker's return")
        stream.join(30)
        assert stream.ended_at, "the stream hangs"
        event = json.loads(stream.lines[-2].removeprefix("data: "))
        assert "error" in event and stream.lines[-1] == "data: [DONE]", stream.lines[-3:]
        for call in queued:
            call.join(60)
        assert [c.status for c in queued] == [200, 200, 200], [c.result for c in queued]
        after = Call(cluster.base_url, stream=False, max_tokens=4, model=MODEL)
        after.join(30)
        assert after.status == 200, after.result
        assert [w.id for w in workers(again.url, MODEL)] == [worker.id]
        print(f"served again {time.monotonic() - killed:.1f} s after the kill")
    finally:
        again.stop()


def test_requests_after_every_connection_was_cut_while_idle_are_served(
    broker: tuple[EmbeddedRedis, Path], tmp_path: Path
) -> None:
    """Each round cuts every normal client (the worker's consumer and its BRPOP, the
    gateway's pool), waits a little or not at all, then sends a whole and a streamed
    request: both must be served, by the same worker."""
    server, _ = broker
    model = make_model(tmp_path / f"{MODEL}.gguf")
    cluster = start_cluster(server.url, tmp_path / "logs", [["--model", str(model)]])
    admin = redis.Redis.from_url(server.url)
    try:
        (worker,) = workers(cluster.redis_url, MODEL)
        for pause in (0.0, 0.3, 1.5):
            cut = admin.client_kill_filter(_type="normal", skipme=True)
            assert cut > 0
            time.sleep(pause)
            calls = [
                Call(cluster.base_url, stream=stream, max_tokens=4, model=MODEL)
                for stream in (False, True)
            ]
            for call in calls:
                call.join(30)
            whole, streamed = calls
            assert whole.ended_at and whole.status == 200, (pause, whole.result, cluster.logs())
            assert streamed.ended_at and streamed.status == 200, (pause, cluster.logs())
            assert streamed.lines[-1] == "data: [DONE]", (pause, streamed.lines[-3:])
            assert not any('"error"' in line for line in streamed.lines), streamed.lines[-3:]
        assert [w.id for w in workers(cluster.redis_url, MODEL)] == [worker.id]
    finally:
        admin.close()
        cluster.stop()


def test_a_queued_request_the_broker_lost_is_queued_again(
    broker: tuple[EmbeddedRedis, Path], tmp_path: Path
) -> None:
    """Its enqueue is taken out of Redis (record, message, live count: what a replica that
    had not received it yet lacks after a failover), then the gateway's pub/sub connection
    is cut, as the failover cuts it: once reconnected, the gateway finds the record gone and
    queues the request again, and it is served."""
    server, _ = broker
    model = slow_model(tmp_path / f"{MODEL}.gguf")
    args = ["--model", str(model), "--slots", "1", "--ctx-size", "16384"]
    cluster = start_cluster(server.url, tmp_path / "logs", [args])
    admin = redis.Redis.from_url(server.url, decode_responses=True)
    try:
        with Blocker(cluster.base_url, MODEL) as blocker:
            waiting = Call(cluster.base_url, stream=False, max_tokens=4, model=MODEL)
            assert wait_for(lambda: len(_queued(admin)) == 1, 10), cluster.logs()
            ((queue, entry),) = _queued(admin)
            request_id = json.loads(entry)["headers"]["id"]
            assert admin.lrem(queue, 0, entry) == 1
            assert admin.delete(redis_keys.request_key(request_id)) == 1
            admin.zrem(redis_keys.live_key(queue), request_id)
            # the cut also ends the blocker's stream (its frames may be lost): the slot frees
            _cut_pubsub_of(admin, cluster.children[0].pid)
            waiting.join(60)
            assert blocker.join(10), "the cut stream did not end"
        assert waiting.status == 200, (waiting.result, cluster.logs())
        assert waiting.request_id == request_id
        assert waiting.result["choices"][0]["finish_reason"] == "length"
        assert admin.hget(redis_keys.request_key(request_id), "state") == "done"
        assert "error" in blocker.events[-2], blocker.events[-2:]  # the cut stream: told
    finally:
        admin.close()
        cluster.stop()


def _queued(admin: redis.Redis) -> list[tuple[str, str]]:
    """(queue, message) of every task message waiting in a model queue."""
    found = []
    for key in admin.scan_iter(f"*{MODEL}*", _type="list"):
        found += [(str(key), str(entry)) for entry in admin.lrange(key, 0, -1)]
    return found


def _cut_pubsub_of(admin: redis.Redis, pid: int | None) -> None:
    """Kill the pub/sub connections process `pid` holds (the gateway's hub), no other."""
    assert pid is not None
    ports = {c.laddr.port for c in psutil.Process(pid).net_connections(kind="tcp") if c.laddr}
    ours = [
        c
        for c in admin.client_list()
        if int(c["psub"]) + int(c["sub"]) > 0 and int(c["addr"].rsplit(":", 1)[1]) in ports
    ]
    assert ours, "the gateway holds no pub/sub connection"
    for client in ours:
        admin.client_kill_filter(_id=client["id"])

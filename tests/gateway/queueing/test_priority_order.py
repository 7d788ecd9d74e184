"""Queueing promises on real parts: strict priority, bounded queues, deadlines, cancel.

One worker with one slot serves `q-chat`; a long "blocker" generation holds the slot
while the test queues work behind it, then cancels the blocker to let the queue drain.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from common import redis_keys
from common.net import free_port
from common.priority import Priority
from corral.redis_server import EmbeddedRedis
from tests.conftest import Cluster, start_cluster
from tests.gateway.helpers import samples, value
from tests.support import Blocker, busy_slots, corral_child, slow_model, wait_for, workers

MODEL = "q-chat"
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def qcluster(
    redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("queueing")
    model = slow_model(root / f"{MODEL}.gguf")  # a Blocker lasts
    running = start_cluster(
        redis_server.url,
        root / "logs",
        [["--model", str(model), "--slots", "1", "--ctx-size", "16384"]],
    )
    yield running
    running.stop()


def _depth(cluster: Cluster, priority: str) -> int:
    stats = httpx.get(f"{cluster.base_url}/v1/queue/stats").json()
    return int(stats["models"][MODEL]["priorities"][priority]["depth"])


def _at_depth(cluster: Cluster, priority: str, n: int) -> Callable[[], bool]:
    return lambda: _depth(cluster, priority) == n


def _record(cluster: Cluster, request_id: str) -> dict[str, Any]:
    r = httpx.get(f"{cluster.base_url}/v1/requests/{request_id}")
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


class Background:
    """Non-streaming requests sent concurrently from a background event loop."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.client = httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=200))

    def send(
        self,
        n: int,
        priority: str,
        base_url: str | None = None,
        timeout: str | None = None,
        request_id: str | None = None,
        **extra: Any,
    ) -> list[Any]:
        body = {"model": MODEL, "messages": HI, "max_tokens": 1, **extra}
        headers = {"X-Request-Priority": priority}
        if timeout is not None:
            headers["X-Request-Timeout"] = timeout
        if request_id is not None:
            headers["X-Request-ID"] = request_id
        url = f"{base_url or self.base_url}/v1/chat/completions"
        return [
            asyncio.run_coroutine_threadsafe(
                self.client.post(url, json=body, headers=headers),
                self.loop,
            )
            for _ in range(n)
        ]

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.client.aclose(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def background(qcluster: Cluster) -> Iterator[Background]:
    bg = Background(qcluster.base_url)
    yield bg
    bg.close()


def test_strict_priority_high_then_normal_then_low(
    qcluster: Cluster, background: Background
) -> None:
    with Blocker(qcluster.base_url, MODEL) as blocker:
        futures = {}
        for priority, n in (("low", 50), ("normal", 10), ("high", 5)):
            futures[priority] = background.send(n, priority)
            assert wait_for(_at_depth(qcluster, priority, n), 20, 0.05)
        blocker.cancel()
        replies = {p: [f.result(60) for f in fs] for p, fs in futures.items()}
    started = []
    for priority, rs in replies.items():
        for r in rs:
            assert r.status_code == 200, r.text
            rec = _record(qcluster, r.headers["x-request-id"])
            started.append((rec["started_at"], priority))
    order = [p for _, p in sorted(started)]
    assert order == ["high"] * 5 + ["normal"] * 10 + ["low"] * 50
    # the blocker's own client was told it was cancelled, then [DONE]
    assert '"cancelled"' in blocker.events[-2] and blocker.events[-1] == "data: [DONE]"


def test_the_cap_is_per_priority_and_counts_live_requests_only(
    qcluster: Cluster, background: Background, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    """A cap of 3: a fourth low request is refused (429), a high one still gets in; a
    cancelled and an expired low request stop counting at once, though their entries
    stay in the queue's list until a worker pops and drops them."""
    port = free_port()
    small = corral_child(
        "gateway-small",
        ["gateway", "--port", str(port)],
        tmp_path / "gw.log",
        CORRAL_REDIS_URL=redis_server.url,
        CORRAL_MAX_QUEUE_SIZE_PER_MODEL="3",
    )
    small.start()
    r = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        base = f"http://127.0.0.1:{port}"
        assert wait_for(lambda: _up(base), 30, 0.1)
        with Blocker(qcluster.base_url, MODEL):
            queued = background.send(3, "low")
            assert wait_for(lambda: _depth(qcluster, "low") == 3, 20, 0.05)
            full = _post(base, "low")
            assert full.status_code == 429, full.text
            assert full.json()["error"]["code"] == "queue_full"
            assert "low queue" in full.json()["error"]["message"]
            assert int(full.headers["retry-after"]) >= 1
            counted = samples(httpx.get(f"{base}/metrics").text)  # under its model
            assert value(counted, "corral_requests_total", model=MODEL, status="429") == 1
            high = background.send(1, "high", base_url=base)  # its own queue has room
            assert wait_for(lambda: _depth(qcluster, "high") == 1, 20, 0.05)

            low_live = redis_keys.live_key(redis_keys.queue_name(MODEL, Priority.LOW))
            cancelled = str(r.zrange(low_live, 0, 0)[0])
            httpx.post(f"{qcluster.base_url}/v1/requests/{cancelled}/cancel")
            assert _depth(qcluster, "low") == 2
            assert r.llen(redis_keys.queue_name(MODEL, Priority.LOW)) == 3  # still listed
            brief = background.send(1, "low", base_url=base, timeout="1")
            assert wait_for(lambda: _depth(qcluster, "low") == 3, 20, 0.05)
            time.sleep(1.2)  # its deadline passes while it waits
            assert _depth(qcluster, "low") == 2
            again = background.send(1, "low", base_url=base)  # room again: two live, cap 3
            assert wait_for(lambda: _depth(qcluster, "low") == 3, 20, 0.05)
        assert high[0].result(60).status_code == 200
        assert again[0].result(60).status_code == 200
        assert brief[0].result(60).status_code == 504
        codes = sorted(f.result(60).status_code for f in queued)
        assert codes == [200, 200, 499], codes  # the cancelled one hears so
    finally:
        r.close()
        small.stop()


def _post(base: str, priority: str) -> httpx.Response:
    body = {"model": MODEL, "messages": HI, "max_tokens": 1}
    headers = {"X-Request-Priority": priority}
    return httpx.post(f"{base}/v1/chat/completions", json=body, headers=headers, timeout=30)


def _up(base: str) -> bool:
    try:
        return httpx.get(f"{base}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_deadline_passed_in_queue_is_504_and_never_runs(qcluster: Cluster) -> None:
    with Blocker(qcluster.base_url, MODEL):
        t0 = time.monotonic()
        r = httpx.post(
            f"{qcluster.base_url}/v1/chat/completions",
            json={"model": MODEL, "messages": HI, "max_tokens": 1},
            headers={"X-Request-Timeout": "1"},
            timeout=30,
        )
        assert r.status_code == 504, r.text
        assert 0.9 < time.monotonic() - t0 < 5
        assert r.json()["error"]["type"] == "timeout_error"
        expired_id = r.headers["x-request-id"]
    _drain(qcluster)
    rec = _record(qcluster, expired_id)
    assert rec["state"] == "expired" and rec["started_at"] is None


def test_invalid_timeout_header_is_400(qcluster: Cluster) -> None:
    r = httpx.post(
        f"{qcluster.base_url}/v1/chat/completions",
        json={"model": MODEL, "messages": HI},
        headers={"X-Request-Timeout": "soon"},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_timeout"


def test_disconnect_while_queued_never_runs(qcluster: Cluster) -> None:
    """... and counts as the client's (499) in the gateway's metrics, not as a 500."""
    before = samples(httpx.get(f"{qcluster.base_url}/metrics").text)
    with Blocker(qcluster.base_url, MODEL):
        body = {"model": MODEL, "messages": HI, "max_tokens": 1, "stream": True}
        sock = raw_post(qcluster.base_url, "/v1/chat/completions", body)
        assert wait_for(lambda: _depth(qcluster, "normal") == 1, 20, 0.05)
        queued_id = _queued_request_id(qcluster)
        sock.close()  # the client goes away while its request waits
        assert wait_for(lambda: _record(qcluster, queued_id)["state"] == "cancelled", 5)
    _drain(qcluster)
    rec = _record(qcluster, queued_id)
    assert rec["state"] == "cancelled" and rec["started_at"] is None
    after = samples(httpx.get(f"{qcluster.base_url}/metrics").text)
    for status, grew in (("499", 1), ("500", 0)):
        labels = {"endpoint": "chat", "model": MODEL, "priority": "normal", "status": status}
        assert (
            value(after, "corral_requests_total", **labels)
            - value(before, "corral_requests_total", **labels)
            == grew
        ), status


def raw_post(base_url: str, path: str, body: dict[str, Any]) -> socket.socket:
    """Send a request on a bare socket, so the test can drop the connection at will."""
    host, port = base_url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    return sock


def _queued_request_id(cluster: Cluster) -> str:
    import redis

    r = redis.Redis.from_url(cluster.redis_url)
    raw = r.lindex(f"p2-normal.{MODEL}", -1)
    r.close()
    assert raw is not None
    return str(json.loads(raw)["headers"]["id"])


def test_cancel_running_by_id_frees_the_slot(qcluster: Cluster) -> None:
    (worker,) = workers(qcluster.redis_url, MODEL)
    upstream = worker.upstream
    assert upstream
    with Blocker(qcluster.base_url, MODEL) as blocker:
        assert busy_slots(upstream) == 1
        assert _record(qcluster, blocker.request_id)["state"] == "running"
        blocker.cancel()
        assert wait_for(lambda: busy_slots(upstream) == 0, 1.0)
        assert wait_for(lambda: _record(qcluster, blocker.request_id)["state"] == "cancelled", 5)
    r = httpx.post(f"{qcluster.base_url}/v1/requests/{blocker.request_id}/cancel")
    assert r.status_code == 409
    assert httpx.get(f"{qcluster.base_url}/v1/requests/req_nope").status_code == 404


def test_queued_request_reports_its_position(qcluster: Cluster, background: Background) -> None:
    with Blocker(qcluster.base_url, MODEL) as blocker:
        lows = background.send(2, "low")
        assert wait_for(lambda: _depth(qcluster, "low") == 2, 20, 0.05)
        high = background.send(1, "high")
        assert wait_for(lambda: _depth(qcluster, "high") == 1, 20, 0.05)
        import redis

        r = redis.Redis.from_url(qcluster.redis_url, decode_responses=True)
        ids = {
            p: [_task_id(m) for m in reversed(r.lrange(f"{p}.{MODEL}", 0, -1))]
            for p in ("p1-high", "p3-low")
        }
        r.close()
        positions = [_record(qcluster, i)["position"] for i in ids["p1-high"] + ids["p3-low"]]
        assert positions == [1, 2, 3]
        stats = httpx.get(f"{qcluster.base_url}/v1/queue/stats").json()["models"][MODEL]
        assert stats["running"] == 1
        assert (
            stats["priorities"]["low"]["oldest_wait_s"]
            >= stats["priorities"]["high"]["oldest_wait_s"]
        )
        assert (
            _record(qcluster, blocker.request_id)["worker"]
            == workers(qcluster.redis_url, MODEL)[0].id
        )
    assert all(f.result(60).status_code == 200 for f in lows + high)


def _task_id(message: bytes | str) -> str:
    return str(json.loads(message)["headers"]["id"])


def _drain(cluster: Cluster) -> None:
    """Wait until the model's queues are empty and nothing runs."""

    def idle() -> bool:
        stats = httpx.get(f"{cluster.base_url}/v1/queue/stats").json()["models"][MODEL]
        return stats["running"] == 0 and all(p["depth"] == 0 for p in stats["priorities"].values())

    assert wait_for(idle, 30, 0.1)


def test_a_queued_request_is_found_and_cancelled_by_the_clients_own_id(
    qcluster: Cluster, background: Background
) -> None:
    """Our `X-Request-ID` comes with the reply, which waits for the first token; the
    client's own id finds the request at once. A malformed one is not taken."""
    with Blocker(qcluster.base_url, MODEL):
        mine = background.send(1, "high", request_id="job-42.a")
        assert wait_for(lambda: _status(qcluster, "job-42.a") == 200, 20, 0.05)
        record = httpx.get(f"{qcluster.base_url}/v1/requests/job-42.a").json()
        assert record["state"] == "queued" and record["client_request_id"] == "job-42.a"
        assert record["request_id"].startswith("req_") and record["position"] == 1
        cancelled = httpx.post(f"{qcluster.base_url}/v1/requests/job-42.a/cancel").json()
        assert cancelled["state"] == "cancelled"
        bad = background.send(1, "high", request_id="not a sane id")
        assert wait_for(lambda: _depth(qcluster, "high") == 1, 20, 0.05)
        assert _status(qcluster, "not a sane id") == 404
    assert mine[0].result(30).status_code == 499
    assert bad[0].result(60).status_code == 200


def _status(cluster: Cluster, some_id: str) -> int:
    return httpx.get(f"{cluster.base_url}/v1/requests/{some_id}").status_code

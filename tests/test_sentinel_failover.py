"""Broker high availability through Redis Sentinel, on real parts: a Valkey primary, a
replica and three sentinels on loopback ports, a real gateway and worker on the Sentinel
URL. The primary is killed (SIGKILL) under a steady load of streaming and non-streaming
requests; the sentinels promote the replica and every Corral process finds it by itself.

Each request ends one of four ways: completed (a whole reply), errored clearly (an OpenAI
error envelope: a 5xx/429 reply, or an error event then `[DONE]` in a stream), hung (no
end within the client's timeout) or lost (anything else: a reply cut short without an
error, a dropped connection, a 200 without its completion). None may hang nor be lost, and
the cluster must serve again within a bound. `pytest -s` prints the figures."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from common import redis_keys
from common.net import free_port
from common.redis_conn import RedisTarget
from tests.conftest import CHAT
from tests.support import (
    SentinelSet,
    alive,
    corral_child,
    tail,
    wait_for,
    wait_healthy,
    wait_ready,
)

pytestmark = pytest.mark.slow  # runs Corral processes

MASTER = "corral-test"
DOWN_AFTER_MS = 1000  # sentinels call the primary down after this much silence
CLIENT_TIMEOUT_S = 30.0  # a request with no end by then is counted as hung
SERVE_AGAIN_BOUND_S = 30.0
THREADS = 4


@dataclass
class Outcome:
    kind: str  # completed | errored | hung | lost
    started: float
    ended: float
    detail: str = ""


def call(url: str, stream: bool, n: int) -> Outcome:
    """One chat completion; how it ended."""
    body = {
        "model": CHAT,
        "messages": [{"role": "user", "content": f"failover {n}"}],
        "max_tokens": 16,
        "stream": stream,
    }
    started = time.monotonic()
    try:
        with httpx.stream("POST", url, json=body, timeout=CLIENT_TIMEOUT_S) as resp:
            kind, detail = (_streamed if stream and resp.status_code == 200 else _replied)(resp)
    except httpx.TimeoutException as exc:
        kind, detail = "hung", repr(exc)
    except httpx.HTTPError as exc:
        kind, detail = "lost", repr(exc)
    return Outcome(kind, started, time.monotonic(), detail)


def _replied(resp: httpx.Response) -> tuple[str, str]:
    text = resp.read().decode()
    try:
        data = json.loads(text)
    except ValueError:
        return "lost", f"{resp.status_code} not JSON: {text[:200]}"
    if resp.status_code == 200:
        choice = (data.get("choices") or [{}])[0]
        done = choice.get("finish_reason") and data.get("usage")
        return ("completed", "") if done else ("lost", text[:200])
    if resp.status_code >= 429 and isinstance(data.get("error"), dict):
        return "errored", f"{resp.status_code} {data['error'].get('code')}"
    return "lost", f"{resp.status_code} {text[:200]}"


def _streamed(resp: httpx.Response) -> tuple[str, str]:
    events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    if not events or events[-1] != "[DONE]":
        return "lost", f"stream ended without [DONE]: {events[-2:]}"
    chunks = [json.loads(e) for e in events[:-1]]
    errors = [c["error"] for c in chunks if "error" in c]
    if errors:
        return "errored", f"stream error {errors[-1].get('code')}"
    finished = any(ch.get("finish_reason") for c in chunks for ch in c.get("choices", []))
    return ("completed", "") if finished else ("lost", "no finish_reason")


class Load:
    """`THREADS` clients sending requests back to back (every other one streaming)."""

    def __init__(self, base_url: str) -> None:
        self.url = f"{base_url}/v1/chat/completions"
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(THREADS)
        ]

    def _run(self, i: int) -> None:
        n = i
        while not self._stop.is_set():
            outcome = call(self.url, stream=n % 2 == 0, n=n)
            with self._lock:
                self.outcomes.append(outcome)
            if outcome.kind != "completed":
                time.sleep(0.1)  # as a client that retries would
            n += THREADS

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(CLIENT_TIMEOUT_S + 5)

    def completed_since(self, t: float) -> int:
        with self._lock:
            return sum(1 for o in self.outcomes if o.kind == "completed" and o.started > t)


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[SentinelSet]:
    with SentinelSet(tmp_path / "valkey", MASTER, down_after_ms=DOWN_AFTER_MS) as group:
        yield group


def test_primary_killed_under_load(sentinels: SentinelSet, model_dir: Path, tmp_path: Path) -> None:
    env = {"CORRAL_REDIS_URL": sentinels.url, "CORRAL_REDIS_SENTINEL_MASTER": MASTER}
    port, flower_port = free_port(), free_port()
    base_url = f"http://127.0.0.1:{port}"
    logs = tmp_path / "logs"
    logs.mkdir()
    children = [
        corral_child("gateway", ["gateway", "--port", str(port)], logs / "gateway.log", **env),
        corral_child(
            "worker",
            ["worker", "--model", str(model_dir / f"{CHAT}.gguf"), "--slots", "2"],
            logs / "worker.log",
            **env,
        ),
        corral_child(
            "flower",
            ["flower", "--port", str(flower_port), "--basic-auth", "admin:secret"],
            logs / "flower.log",
            **env,
        ),
    ]

    def cluster_logs() -> str:
        return "\n".join(f"--- {p.name}\n{tail(p)}" for p in sorted(logs.glob("*.log")))

    try:
        for child in children:
            child.start()
        wait_healthy(base_url, 0)
        wait_ready(sentinels.primary.url, [c.pid for c in children[1:2] if c.pid])
        body = {"model": CHAT, "messages": [{"role": "user", "content": "hi"}]}
        line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": body}
        upload = ("kept.jsonl", json.dumps(line).encode() + b"\n")
        files = {"file": upload}
        reply = httpx.post(f"{base_url}/v1/files", data={"purpose": "batch"}, files=files)
        assert reply.status_code == 200, reply.text
        with Load(base_url) as load:
            assert wait_for(lambda: load.completed_since(0) >= 20, 30), cluster_logs()
            killed = time.monotonic()
            sentinels.primary._child.send_signal(signal.SIGKILL)
            served = wait_for(lambda: load.completed_since(killed) >= 1, SERVE_AGAIN_BOUND_S)
            assert served, f"not serving again\n{cluster_logs()}\n{sentinels.logs()}"
            wait_for(lambda: load.completed_since(killed) >= 40, 30)
        assert sentinels.replica and sentinels.master_port() == sentinels.replica.port
        assert all(c.pid and alive(c.pid) for c in children), "no Corral process restarted"
        # What was acknowledged before the kill is on the promoted replica.
        kept = httpx.get(f"{base_url}/v1/files/{reply.json()['id']}/content")
        assert kept.status_code == 200 and kept.content == upload[1], kept.text
        with RedisTarget(sentinels.url, MASTER).client() as client:  # as every part sees it
            assert client.info("replication")["role"] == "master"
            assert client.hexists(redis_keys.CATALOG, CHAT)
        # Flower reads the queues on the new master.
        queues = f"http://127.0.0.1:{flower_port}/api/queues/length"
        lengths = httpx.get(queues, auth=("admin", "secret"), timeout=10)
        assert lengths.status_code == 200, tail(logs / "flower.log")
        names = {q["name"] for q in lengths.json()["active_queues"]}
        assert set(redis_keys.worker_queues(CHAT)) <= names, names
    finally:
        for child in reversed(children):
            child.stop(grace=10)

    outcomes = load.outcomes
    counts = Counter(o.kind for o in outcomes)
    after = sorted((o for o in outcomes if o.started > killed), key=lambda o: o.ended)
    first_served = next(o.ended for o in after if o.kind == "completed") - killed
    failed = [o for o in outcomes if o.kind != "completed"]
    last_error = max((o.ended - killed for o in failed), default=None)
    errors_until = "no error" if last_error is None else f"last error at {last_error:.1f} s"
    print(
        f"\nSentinel failover: serving again {first_served:.1f} s after the kill "
        f"({errors_until}); requests: {len(outcomes)}, completed {counts['completed']}, "
        f"errored clearly {counts['errored']}, hung {counts['hung']}, lost {counts['lost']}; "
        f"errors: {dict(Counter(o.detail for o in failed if o.kind == 'errored'))}"
    )
    bad = [o for o in outcomes if o.kind in ("hung", "lost")]
    assert not bad, f"{bad}\n{cluster_logs()}"
    assert first_served < SERVE_AGAIN_BOUND_S

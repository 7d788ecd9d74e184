"""Models across the cluster, on real parts: a gateway and three CPU workers with
small RAM budgets and no model at start, generated models of different sizes, real
llama-server children, a Valkey of their own (placement must not see the session cluster).

Sizes (RSS measured here / estimated): small ~29 / 31 MiB, mid ~77 / 95 MiB, huge ~200 /
206 MiB; every budget is 110 MiB, so one worker holds any one of small, mid, mid2, pinned
and nobody can hold huge. `min_residency` 30 s with `max_swap_wait` 3 s: a fresh model is
swapped out only for a request that waited 3 s.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
import redis
import yaml
from openai.types.chat import ChatCompletionMessageParam

from common import redis_keys
from common.estimate import estimate_file
from common.memory import MemoryRecord
from common.registry import ModelEvent
from corral.redis_server import EmbeddedRedis
from corral.tinymodel import make_model
from tests.conftest import Cluster, start_cluster
from tests.support import wait_for, workers

pytestmark = pytest.mark.slow  # every test here runs Corral processes

BUDGET = "110MiB"
HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hi"}]
ESTIMATE_TOLERANCE = 1.3  # measured RSS <= estimate <= 1.3 x measured (compute buffers)


@pytest.fixture(scope="module")
def mc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("placement")
    models = {
        "small": make_model(root / "small.gguf"),
        "mid": make_model(root / "mid.gguf", n_embd=512, n_ff=2048),
        "mid2": make_model(root / "mid2.gguf", n_embd=512, n_ff=2048, seed=2),
        "pinned": make_model(root / "pinned.gguf", seed=3),
        "ttl": make_model(root / "ttl.gguf", seed=4),
        "huge": make_model(root / "huge.gguf", n_embd=512, n_ff=2048, n_layer=8),
        "pre": make_model(root / "pre.gguf", seed=5),
    }
    corrupt = root / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 4096)
    config: dict[str, Any] = {
        "models": {a: {"model_path": str(p), "ctx_size": 2048} for a, p in models.items()},
        "min_residency": 30,
        "max_swap_wait": 3,
        "load_timeout": 20,
    }
    config["models"]["mid"]["ctx_size"] = 4096  # long generations keep it busy for seconds
    config["models"]["pinned"]["pinned"] = True
    config["models"]["ttl"]["idle_ttl"] = 2
    config["models"]["corrupt"] = {"model_path": str(corrupt)}
    config["models"]["pre"].update(preload=True, replicas=2)
    path = root / "corral.yaml"
    path.write_text(yaml.safe_dump(config))
    with EmbeddedRedis() as server:
        running = start_cluster(
            server.url,
            root / "logs",
            # three "machines": each worker a device of its own, with its own budget
            [["--ram-budget", BUDGET, "--device", f"machine{i}"] for i in range(3)],
            worker_states=("empty",),
            CORRAL_CONFIG=str(path),
        )
        try:
            # preload: two copies of `pre` come up by themselves (the tests eject them)
            assert wait_for(
                lambda: (
                    len([w for w in workers(server.url) if w.model == "pre" and w.state == "ready"])
                    == 2
                ),
                30,
                0.1,
            ), running.logs()
            yield running
        finally:
            for child in running.children[1:]:
                child.send_signal(signal.SIGTERM)  # workers stop in parallel, then in order
            running.stop()


@pytest.fixture(autouse=True)
def clean(mc: Cluster) -> Iterator[None]:
    """Each test starts with every worker empty and no failure on record."""
    with httpx.Client(base_url=mc.base_url, timeout=10) as http:
        for w in workers(mc.redis_url):
            for alias in w.failed:
                http.post(f"/v1/models/{alias}/reset")
            if w.model:
                http.post("/v1/models/eject", json={"model": w.model})
    ok = wait_for(
        lambda: all(
            w.state == "empty" and not w.failed and not w.next_model for w in workers(mc.redis_url)
        ),
        20,
        0.1,
    )
    assert ok, [w.model_dump() for w in workers(mc.redis_url)]
    yield


class Events:
    """Every ModelEvent published while it listens (the workers' own reports)."""

    def __init__(self, redis_url: str) -> None:
        self.items: list[ModelEvent] = []
        self._client = redis.Redis.from_url(redis_url)
        self._pubsub = self._client.pubsub()
        self._pubsub.subscribe(redis_keys.EVENTS)
        self._pubsub.get_message(timeout=2)  # the subscribe confirmation
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            msg = self._pubsub.get_message(timeout=0.1)
            if msg and msg["type"] == "message":
                self.items.append(ModelEvent.model_validate_json(msg["data"]))

    def states(self, alias: str) -> list[str]:
        return [e.state.value for e in self.items if e.model == alias]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._pubsub.close()
        self._client.close()


@pytest.fixture
def events(mc: Cluster) -> Iterator[Events]:
    ev = Events(mc.redis_url)
    yield ev
    ev.close()


def chat(mc: Cluster, model: str, **kw: Any) -> str:
    kw.setdefault("max_tokens", 4)
    with mc.client(timeout=60) as client:
        reply = client.chat.completions.create(model=model, messages=HI, **kw)
    return reply.choices[0].message.content or ""


def holder(mc: Cluster, alias: str) -> str | None:
    found = [w.id for w in workers(mc.redis_url) if w.model == alias and w.state == "ready"]
    return found[0] if found else None


def load(mc: Cluster, *aliases: str) -> None:
    replies = []
    for alias in aliases:
        r = httpx.post(f"{mc.base_url}/v1/models/load", json={"model": alias}, timeout=10)
        assert r.status_code == 202, r.text
        replies.append(r.json())
    assert wait_for(lambda: all(holder(mc, a) for a in aliases), 20, 0.1), replies


def test_cold_request_loads_once_for_ten_concurrent_requests(mc: Cluster, events: Events) -> None:
    with ThreadPoolExecutor(10) as pool:
        replies = list(pool.map(lambda _: chat(mc, "small"), range(10)))
    assert len(replies) == 10
    assert events.states("small").count("loading") == 1, events.items
    assert len([w for w in workers(mc.redis_url) if w.model == "small"]) == 1
    card = httpx.get(f"{mc.base_url}/v1/models/small", timeout=5).json()
    assert (card["status"], card["replicas"]) == ("ready", 1)


def test_model_bigger_than_every_budget_is_503_naming_need_and_budget(mc: Cluster) -> None:
    with pytest.raises(openai.APIStatusError) as err, mc.client() as client:
        client.chat.completions.create(model="huge", messages=HI, max_tokens=2)
    assert err.value.status_code == 503
    body = err.value.response.json()["error"]
    assert body["code"] == "no_capacity"
    need = estimate_file(Path(mc.log_dir).parent / "huge.gguf", ctx_size=2048, slots=2)
    assert f"needs {need.total_mb} MiB" in body["message"], body
    assert "largest device budget is 110 MiB" in body["message"], body


def test_lru_idle_model_is_evicted_never_a_pinned_one(mc: Cluster, events: Events) -> None:
    load(mc, "pinned", "mid", "small")
    time.sleep(1.2)  # a heartbeat apart: `small` becomes the most recently used
    chat(mc, "small")
    time.sleep(1.2)  # and the registry shows it
    on_mid = holder(mc, "mid")
    started = time.monotonic()
    chat(mc, "mid2")  # every worker holds a fresh model: waits max_swap_wait, evicts LRU
    waited = time.monotonic() - started
    assert holder(mc, "mid2") == on_mid, events.items
    assert holder(mc, "pinned") and holder(mc, "small")
    assert events.states("mid")[-2:] == ["unloading", "off"]
    assert "unloading" not in events.states("pinned") + events.states("small")
    assert waited >= 3.0, "min_residency: the fresh model was swapped without waiting"


def test_busy_model_is_not_evicted(mc: Cluster, events: Events) -> None:
    load(mc, "pinned", "small", "mid")
    with mc.client(timeout=60) as client:
        stream = client.completions.create(
            model="mid", prompt="hi", max_tokens=1200, stream=True, extra_body={"ignore_eos": True}
        )
        first = next(iter(stream))
        assert first.choices
        # `small` is idle: evicted after max_swap_wait; `mid` streams, `pinned` is pinned
        on_small = holder(mc, "small")
        chat(mc, "mid2")
        assert holder(mc, "mid2") == on_small
        assert holder(mc, "mid"), "a busy model was evicted"
        tokens = sum(1 for _ in stream)
    assert tokens > 100
    assert "unloading" not in events.states("mid")


def test_min_residency_prevents_a_swap(mc: Cluster, events: Events) -> None:
    load(mc, "small", "mid", "pinned")
    result: list[str] = []
    thread = threading.Thread(target=lambda: result.append(chat(mc, "mid2")))
    thread.start()
    time.sleep(2.0)  # < max_swap_wait: the fresh models stay
    assert not any(e.state.value == "unloading" for e in events.items), events.items
    assert holder(mc, "mid2") is None
    thread.join(30)
    assert result, mc.logs()
    assert holder(mc, "mid2")


def test_idle_ttl_unloads(mc: Cluster, events: Events) -> None:
    chat(mc, "ttl")
    assert holder(mc, "ttl")
    assert wait_for(lambda: not any(w.model == "ttl" for w in workers(mc.redis_url)), 10, 0.1)
    assert events.states("ttl") == ["loading", "ready", "unloading", "off"]


def test_killed_llama_server_is_restarted_and_serves(mc: Cluster, events: Events) -> None:
    chat(mc, "small")
    (info,) = [w for w in workers(mc.redis_url) if w.model == "small"]
    children = [p for p in psutil.Process(info.pid).children() if "llama-server" in p.name()]
    assert len(children) == 1
    children[0].kill()  # kill -9
    assert wait_for(
        lambda: any(
            w.model == "small" and w.state == "ready" and w.restarts == 1
            for w in workers(mc.redis_url)
        ),
        15,
        0.1,
    ), mc.logs()
    assert chat(mc, "small") is not None
    assert events.states("small")[-2:] == ["loading", "ready"]


def test_corrupt_gguf_fails_then_reset_clears_it(mc: Cluster, events: Events) -> None:
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as err, mc.client() as client:
        client.chat.completions.create(model="corrupt", messages=HI, max_tokens=2)
    assert time.monotonic() - started < 10, "the load failure must not wait for a timeout"
    assert err.value.status_code == 503
    body = err.value.response.json()["error"]
    assert body["code"] == "model_failed" and "not a loadable GGUF" in body["message"], body
    assert str(Path(mc.log_dir).parent) not in body["message"]  # no server paths to clients
    failed = httpx.get(f"{mc.base_url}/v1/models/failed", timeout=5).json()["failed_models"]
    assert [f["model"] for f in failed] == ["corrupt"]
    assert not any(w.model for w in workers(mc.redis_url)), "nothing was loaded nor evicted"
    with pytest.raises(openai.APIStatusError) as again, mc.client() as client:
        client.chat.completions.create(model="corrupt", messages=HI, max_tokens=2)
    assert again.value.status_code == 503
    # found broken by the gateway at start, from its header: never loaded, never retried
    assert "loading" not in events.states("corrupt")
    reset = httpx.post(f"{mc.base_url}/v1/models/corrupt/reset", timeout=5).json()
    assert reset["status"] == "success" and "not a loadable" in reset["previous_error"]
    assert wait_for(
        lambda: not httpx.get(f"{mc.base_url}/v1/models/failed", timeout=5).json()["failed_models"],
        5,
        0.1,
    )
    status = httpx.get(f"{mc.base_url}/v1/models/corrupt/status", timeout=5).json()
    assert status["status"] == "off"


def test_status_stream_shows_transitions_in_order(mc: Cluster) -> None:
    seen: list[tuple[str, dict[str, Any]]] = []
    ready = threading.Event()

    def read() -> None:
        with httpx.stream("GET", f"{mc.base_url}/v1/models/status/stream", timeout=30) as r:
            event = ""
            for line in r.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    seen.append((event, json.loads(line[6:])))
                    ready.set()
                    if [d["status"] for e, d in seen if d.get("alias") == "small"][-1:] == ["off"]:
                        return

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    assert ready.wait(10)
    load(mc, "small")
    httpx.post(f"{mc.base_url}/v1/models/eject", json={"model": "small"}, timeout=5)
    thread.join(20)
    assert seen[0][0] == "full_status" and seen[0][1]["models"]["small"]["status"] == "off"
    updates = [d["status"] for e, d in seen if e == "model_update" and d["alias"] == "small"]
    assert updates == ["loading", "ready", "unloading", "off"], seen


def test_estimate_vs_measured_rss_within_tolerance(mc: Cluster) -> None:
    load(mc, "small", "mid")
    client = redis.Redis.from_url(mc.redis_url)
    try:
        for alias in ("small", "mid"):
            (raw,) = client.hvals(redis_keys.memory_key(alias))
            rec = MemoryRecord.model_validate_json(raw)
            assert rec.measured_mb and rec.estimate_mb, rec
            assert rec.measured_mb <= rec.estimate_mb <= ESTIMATE_TOLERANCE * rec.measured_mb, rec
    finally:
        client.close()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "corral",
            "models",
            "estimate",
            "mid",
            "--redis-url",
            mc.redis_url,
            "--config",
            str(Path(mc.log_dir).parent / "corral.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "estimate" in out.stdout and "measured" in out.stdout and "MiB" in out.stdout


def test_replicas_spread_requests_over_workers(mc: Cluster) -> None:
    r = httpx.post(
        f"{mc.base_url}/v1/models/load", json={"model": "small", "replicas": 3}, timeout=10
    )
    assert r.status_code == 202 and len(r.json()["placement"]["loads"]) == 3, r.text
    assert wait_for(
        lambda: sum(w.model == "small" and w.state == "ready" for w in workers(mc.redis_url)) == 3,
        20,
        0.1,
    )
    time.sleep(
        1.2
    )  # the consumers' next BRPOP includes the new queues (a queue change bites at the next BRPOP)

    def conversation(i: int) -> None:
        # a different opening each time: one conversation would stay on the replica that
        # holds its prompt cache (prefix affinity), which is not what this test is about
        with mc.client(timeout=60) as client:
            client.chat.completions.create(
                model="small", messages=[{"role": "user", "content": f"Hi {i}"}], max_tokens=64
            )

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(conversation, range(12)))
    served = 0
    for w in workers(mc.redis_url):
        assert w.upstream is not None
        metrics = httpx.get(f"{w.upstream}/metrics", timeout=5).text
        served += any(
            line.startswith("llamacpp:prompt_tokens_total") and float(line.split()[-1]) > 0
            for line in metrics.splitlines()
        )
    assert served >= 2


def test_models_list_and_corral_status_agree_with_the_registry(mc: Cluster) -> None:
    load(mc, "small", "pinned")
    reg = {w.id: w for w in workers(mc.redis_url)}
    cards = {m["id"]: m for m in httpx.get(f"{mc.base_url}/v1/models", timeout=5).json()["data"]}
    for alias, card in cards.items():
        held = [w for w in reg.values() if w.model == alias and w.state == "ready"]
        assert card["replicas"] == len(held), (alias, card)
        assert card["status"] == ("ready" if held else "off"), (alias, card)
    listed = httpx.get(f"{mc.base_url}/v1/workers", timeout=5).json()["data"]
    assert {w["worker"]: w["model"] for w in listed} == {w.id: w.model for w in reg.values()}
    out = subprocess.run(
        [sys.executable, "-m", "corral", "status", "--url", mc.base_url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for w in reg.values():
        (row,) = [ln for ln in lines if ln.startswith(w.id)]
        assert (w.model or "-") in row.split() and w.state.value in row.split(), row
        assert f"/{w.budget_mb}" in row, row
    vram = httpx.get(f"{mc.base_url}/vram", timeout=5).json()
    assert vram["total_budget_mb"] == sum(w.budget_mb or 0 for w in reg.values())


def test_preload_keeps_its_replicas_until_ejected(mc: Cluster) -> None:
    client = redis.Redis.from_url(mc.redis_url)
    try:
        client.srem(redis_keys.EJECTED, "pre")  # as on a fresh start: the reconciler brings it back
        assert wait_for(
            lambda: (
                sum(w.model == "pre" and w.state == "ready" for w in workers(mc.redis_url)) == 2
            ),
            15,
            0.1,
        ), mc.logs()
        r = httpx.post(f"{mc.base_url}/v1/models/eject", json={"model": "pre"}, timeout=5)
        assert r.json()["status"] == "success" and len(r.json()["workers"]) == 2
        assert wait_for(lambda: not any(w.model == "pre" for w in workers(mc.redis_url)), 10)
        time.sleep(2.5)  # a reconcile round: an ejected model stays off
        assert not any(w.model == "pre" for w in workers(mc.redis_url))
        assert client.sismember(redis_keys.EJECTED, "pre")
    finally:
        client.close()


def test_corral_models_load_shows_progress_until_ready(mc: Cluster) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "corral", "models", "load", "small", "--url", mc.base_url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("small: loading") and lines[-1] == "small: ready (1/1 ready)", lines
    assert holder(mc, "small")

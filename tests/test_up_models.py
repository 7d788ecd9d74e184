"""`corral up` as a one-host model manager, on real parts: `corral up --config` with floating
workers on the CPU sharing one memory budget, generated models, real llama-server children,
the official client. Models load on demand and are evicted least recently used first when
the budget is full; a broken model evicts nothing and stops nothing; a killed worker comes
back; the catalog is the running config (an earlier run's models are gone, a GGUF dropped
into models_dir is served without a restart).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
import redis
import yaml

from common import redis_keys
from common.estimate import estimate_file
from common.net import free_port
from common.registry import ModelEvent
from corral.tinymodel import make_model
from tests.support import descendants, env_without_corral, openai_client, wait_for, workers

pytestmark = pytest.mark.slow  # every test here runs Corral processes

HI: list[Any] = [{"role": "user", "content": "Hi"}]
MODELS = ["m1", "m2", "m3", "m4"]


@dataclass
class Up:
    proc: subprocess.Popen[bytes]
    base: str
    data: Path
    log: Path

    @property
    def redis_url(self) -> str:
        run = yaml.safe_load((self.data / "run" / "corral-up.yaml").read_text())
        return str(run["redis_url"])

    def client(self) -> openai.OpenAI:
        return openai_client(f"{self.base}/v1", timeout=60)

    def status(self) -> dict[str, Any]:
        models: dict[str, Any] = httpx.get(f"{self.base}/v1/models/status", timeout=10).json()[
            "models"
        ]
        return models

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_up(root: Path, config: dict[str, Any], *args: str) -> Up:
    path = root / "corral.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    log = root / f"up-{port}.log"
    argv = [sys.executable, "-m", "corral", "up", "--config", str(path), "--port", str(port)]
    argv += ["--data-dir", str(root / "data"), *args]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env_without_corral()
        )
    up = Up(proc, f"http://127.0.0.1:{port}", root / "data", log)
    if not wait_for(lambda: "Corral is up" in up.text() or proc.poll() is not None, 90, 0.2):
        up.stop()
        pytest.fail(up.text())
    assert proc.poll() is None, up.text()
    return up


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("up-models")


@pytest.fixture(scope="module")
def budget(root: Path) -> str:
    """Room for two of the models, not three (each ~30 MiB estimated and measured)."""
    one = estimate_file(make_model(root / "probe.gguf"), ctx_size=2048, slots=2).total_mb
    return f"{int(one * 2.5)}MiB"


@pytest.fixture(scope="module")
def up(root: Path, budget: str) -> Iterator[Up]:
    models_dir = root / "models"
    for seed, alias in enumerate(MODELS):
        make_model(models_dir / f"{alias}.gguf", seed=seed)
    (models_dir / "broken.gguf").write_bytes(b"this is not a model")
    make_model(models_dir / "longctx.gguf", seed=7, ctx=32768)
    config = {
        "models_dir": str(models_dir),
        "min_residency": 0,  # the test swaps models as fast as it asks for them
        "models": {
            **{a: {"ctx_size": 2048} for a in MODELS},
            "m1": {"ctx_size": 2048, "defaults": {"max_tokens": 3}},
            "resident": {
                "model_path": str(models_dir / "m1.gguf"),
                "preload": True,
                "ctx_size": 2048,
                "pinned": True,
            },
            "broken": {},
            "longctx": {"ctx_size": "auto"},
        },
    }
    running = start_up(root, config, "--ram-budget", budget, "--models-per-device", "3")
    yield running
    running.stop()


class Events:
    def __init__(self, url: str) -> None:
        self._client = redis.Redis.from_url(url)
        self._sub = self._client.pubsub()
        self._sub.subscribe(redis_keys.EVENTS)
        self._sub.get_message(timeout=2)

    def drain(self) -> list[ModelEvent]:
        out = []
        while (msg := self._sub.get_message(timeout=0.05)) is not None:
            if msg["type"] == "message":
                out.append(ModelEvent.model_validate_json(msg["data"]))
        return out

    def close(self) -> None:
        self._sub.close()
        self._client.close()


def test_preload_false_models_wait_for_a_request(up: Up) -> None:
    status = up.status()
    assert status["resident"]["status"] == "ready"
    assert {status[a]["status"] for a in MODELS} == {"off"}
    assert "resident" in up.text() and "on demand:" in up.text()


def test_a_budget_for_two_serves_four_models_in_turn(up: Up) -> None:
    """The pinned `resident` holds part of the budget too: with it, one of m1..m4 fits at a
    time... so the budget for two is: resident + one. Each request loads its model and
    evicts the idle one before it, never the pinned one."""
    events = Events(up.redis_url)
    try:
        client = up.client()
        for alias in [*MODELS, "m1"]:
            reply = client.chat.completions.create(model=alias, messages=HI, max_tokens=4)
            assert reply.choices[0].message.content is not None, alias
            ready = [a for a, s in up.status().items() if s["status"] == "ready"]
            assert sorted(ready) == sorted({alias, "resident"}), (alias, ready)
        seen = events.drain()
    finally:
        events.close()
    loads = [e.model for e in seen if e.state.value == "ready"]
    evicted = [e.model for e in seen if e.state.value == "unloading"]
    assert loads == [*MODELS, "m1"], loads
    assert evicted == MODELS, evicted  # each one out for the next, the pinned one never


def test_request_defaults_apply_under_the_requests_own(up: Up) -> None:
    client = up.client()
    short = client.chat.completions.create(model="m1", messages=HI)  # defaults: max_tokens 3
    assert short.usage is not None and short.usage.completion_tokens == 3
    own = client.chat.completions.create(model="m1", messages=HI, max_tokens=5)
    assert own.usage is not None and own.usage.completion_tokens == 5
    changed = httpx.post(f"{up.base}/v1/models/m1/defaults", json={"max_tokens": 2}, timeout=10)
    assert changed.json()["defaults"] == {"max_tokens": 2}
    assert wait_for(
        lambda: (
            client.chat.completions.create(model="m1", messages=HI).usage.completion_tokens  # type: ignore[union-attr]
            == 2
        ),
        5,
        0.3,
    )
    bad = httpx.post(f"{up.base}/v1/models/m1/defaults", json={"stream": True}, timeout=10)
    assert bad.status_code == 400


def test_ctx_size_auto_grows_into_the_room_the_device_has(up: Up) -> None:
    reply = up.client().chat.completions.create(model="longctx", messages=HI, max_tokens=2)
    assert reply.choices[0].message.content is not None
    (placed,) = up.status()["longctx"]["workers"]
    least = 2 * 2048  # `auto` gives each of the 2 slots at least 2048
    assert least < placed["ctx_size"] < 2 * 32768, placed  # more, but not all it was trained for
    assert placed["ctx_size"] % 512 == 0


def test_a_broken_model_is_listed_failed_evicts_nothing_and_stops_nothing(up: Up) -> None:
    failed = httpx.get(f"{up.base}/v1/models/failed", timeout=10).json()["failed_models"]
    assert [f["model"] for f in failed] == ["broken"]
    before = {w.id: w.model for w in workers(up.redis_url)}
    with pytest.raises(openai.APIStatusError) as err:
        up.client().chat.completions.create(model="broken", messages=HI, max_tokens=2)
    assert err.value.status_code == 503
    message = err.value.response.json()["error"]["message"]
    assert "not a loadable GGUF" in message and str(up.data.parent) not in message
    assert {w.id: w.model for w in workers(up.redis_url)} == before  # nothing evicted
    reply = up.client().chat.completions.create(model="resident", messages=HI, max_tokens=2)
    assert reply.choices[0].message.content is not None


def test_a_gguf_dropped_into_models_dir_is_served_without_a_restart(up: Up, root: Path) -> None:
    make_model(root / "models" / "newcomer.gguf", seed=11)
    assert wait_for(lambda: "newcomer" in {m.id for m in up.client().models.list()}, 15, 0.3)
    reply = up.client().chat.completions.create(model="newcomer", messages=HI, max_tokens=2)
    assert reply.choices[0].message.content is not None


def test_a_killed_worker_is_started_again(up: Up) -> None:
    pids = _worker_pids(up)
    assert len(pids) == 3, pids
    victim = pids[0]
    os.kill(victim, signal.SIGKILL)
    assert wait_for(lambda: len(_worker_pids(up)) == 3 and victim not in _worker_pids(up), 30)
    assert wait_for(lambda: "started again" in up.text(), 10), up.text()
    assert "exited (rc=-9); starting it again" in up.text()
    # its registry entry expires; the new worker's comes
    assert wait_for(lambda: len([w for w in workers(up.redis_url) if w.pid != victim]) == 3, 30)
    reply = up.client().chat.completions.create(model="resident", messages=HI, max_tokens=2)
    assert reply.choices[0].message.content is not None


def _worker_pids(up: Up) -> list[int]:
    out = []
    for pid in descendants(up.proc.pid):
        try:
            cmd = psutil.Process(pid).cmdline()
        except psutil.Error:
            continue
        if "worker" in cmd and "corral" in cmd and psutil.Process(pid).ppid() == up.proc.pid:
            out.append(pid)
    return sorted(out)


def test_an_earlier_runs_models_leave_the_catalog(tmp_path: Path) -> None:
    models_dir = tmp_path / "models"
    make_model(models_dir / "old.gguf")
    first = start_up(tmp_path, {"models": {"old": {"model_path": str(models_dir / "old.gguf")}}})
    try:
        assert "old" in {m.id for m in first.client().models.list()}
    finally:
        first.stop()
    make_model(tmp_path / "elsewhere" / "new.gguf")
    config = {"models": {"new": {"model_path": str(tmp_path / "elsewhere" / "new.gguf")}}}
    second = start_up(tmp_path, config)
    try:
        assert {m.id for m in second.client().models.list()} == {"new"}
        started = time.monotonic()
        with pytest.raises(openai.NotFoundError):
            second.client().chat.completions.create(model="old", messages=HI, max_tokens=2)
        assert time.monotonic() - started < 5  # at once, not after a load timeout
    finally:
        second.stop()


def _corral(up: Up, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "corral", *args, "--url", up.base],
        capture_output=True,
        text=True,
        timeout=60,
        env=env_without_corral(),
    )


def test_the_cli_changes_defaults_scans_and_refuses_to_remove_a_configured_model(up: Up) -> None:
    shown = _corral(up, "models", "defaults", "m2", "temperature=0.5", 'stop=["x"]')
    assert shown.returncode == 0, shown.stderr
    assert 'm2: stop=["x"], temperature=0.5' in shown.stdout
    cleared = _corral(up, "models", "defaults", "m2", "--clear")
    assert cleared.returncode == 0 and "m2: no defaults" in cleared.stdout, cleared.stderr
    scanned = _corral(up, "models", "scan")
    assert scanned.returncode == 0 and "m3" in scanned.stdout, scanned.stderr
    configured = _corral(up, "models", "rm", "m3")
    assert configured.returncode == 1 and "remove it from its config" in configured.stderr
    unknown = _corral(up, "models", "rm", "nosuch")
    assert unknown.returncode == 1 and "does not exist" in unknown.stderr

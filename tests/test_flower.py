"""`corral flower` on real parts: a Valkey, a `corral worker` with its llama-server, and
Flower itself as a subprocess, checked through Flower's REST API with basic auth."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil
import pytest
import redis
from celery import Celery, states

from common import redis_keys
from common.celery_config import celery_config
from common.jobs import Job, JobKind
from common.net import free_port
from common.priority import Priority
from common.registry import WorkerInfo, WorkerState
from common.settings import ModelConfig, Settings
from corral import flower
from corral.redis_server import EmbeddedRedis
from corral.tinymodel import make_model

USER, PASSWORD = "ops", "pa:ss,word"  # a colon and a comma: both must survive
GHOST = "ghost"  # a model in the catalog that no worker holds: its tasks wait
T = TypeVar("T")


# --- access rules ----------------------------------------------------------------------


def test_basic_auth_from_flag_or_environment() -> None:
    env = {flower.USER_ENV: "a", flower.PASSWORD_ENV: "b"}
    assert flower.basic_auth("x:y:z", env) == "x:y:z"  # the flag wins; ':' in the password
    assert flower.basic_auth(None, env) == "a:b"
    assert flower.basic_auth(None, {}) is None
    for bad in ("nocolon", ":pw", "user:"):
        with pytest.raises(flower.FlowerRefused, match="USER:PASSWORD"):
            flower.basic_auth(bad, {})
    with pytest.raises(flower.FlowerRefused, match="both"):
        flower.basic_auth(None, {flower.USER_ENV: "a"})


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_unauthenticated_allowed_on_loopback(address: str) -> None:
    flower.check_access(None, address, unauthenticated=True)


@pytest.mark.parametrize("address", ["0.0.0.0", "", "::", "10.0.0.5", "flower.example"])
def test_unauthenticated_refused_elsewhere(address: str) -> None:
    with pytest.raises(flower.FlowerRefused, match="loopback"):
        flower.check_access(None, address, unauthenticated=True)
    flower.check_access("u:p", address, unauthenticated=False)


@pytest.mark.slow
def test_model_queues_include_the_config_when_the_catalog_is_unreachable() -> None:
    settings = Settings(models={"cfg": ModelConfig(model_path=Path("cfg.gguf"))})
    dead = redis.Redis(port=free_port(), socket_connect_timeout=0.5, decode_responses=True)
    try:
        assert flower.ModelQueues(settings, dead).names() == set(redis_keys.worker_queues("cfg"))
    finally:
        dead.close()


def _env_without_corral(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CORRAL_", "FLOWER_"))}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def _corral(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "corral", *args],
        env=_env_without_corral(**env),
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.slow
def test_corral_flower_refuses_all_interfaces_without_credentials() -> None:
    # No broker is listening at that URL: the refusal comes before any connection.
    url = "redis://127.0.0.1:9/0"
    out = _corral(["flower", "--redis-url", url, "--address", "0.0.0.0"])
    assert out.returncode == 2, out.stderr
    assert "without credentials" in out.stderr and "CORRAL_FLOWER_USER" in out.stderr
    out = _corral(["flower", "--redis-url", url, "--address", "0.0.0.0", "--unauthenticated"])
    assert out.returncode == 2, out.stderr
    assert "loopback" in out.stderr


# --- the real stack --------------------------------------------------------------------


class Proc:
    """A `python -m corral ...` child in its own process group, logging to a file."""

    def __init__(self, name: str, args: list[str], log: Path, **env: str) -> None:
        self.name, self.log = name, log
        with log.open("ab") as out:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "corral", *args],
                env=_env_without_corral(**env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM (the process stops its own children), then SIGKILL to its group."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(grace)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait()

    def tail(self, n: int = 30) -> str:
        lines = self.log.read_text(errors="replace").splitlines()[-n:]
        return f"--- {self.name}\n" + "\n".join(lines)


def wait_for(what: str, check: Callable[[], T | None], procs: list[Proc], timeout: float) -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None:
            return result
        dead = [p for p in procs if not p.alive()]
        if dead or time.monotonic() > deadline:
            logs = "\n".join(p.tail() for p in procs)
            raise AssertionError(f"{what}: {'exited' if dead else 'timed out'}\n{logs}")
        time.sleep(0.2)


def processes_using(marker: str) -> list[psutil.Process]:
    """Live processes whose command line mentions `marker` (our tmp dir or port)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and any(
                marker in part for part in proc.info["cmdline"] or []
            ):
                found.append(proc)
        except psutil.Error:
            continue
    return found


@dataclass
class Stack:
    redis_url: str
    flower_url: str
    worker_id: str
    procs: list[Proc]

    def api(self, path: str, auth: tuple[str, str] | None = (USER, PASSWORD)) -> httpx.Response:
        return httpx.get(f"{self.flower_url}{path}", auth=auth, timeout=10)


def _ready_worker(redis_url: str, model: str) -> str | None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        for wid in client.smembers(redis_keys.WORKERS):
            raw = client.get(redis_keys.worker_key(str(wid)))
            if raw is not None:
                info = WorkerInfo.model_validate_json(raw)
                if info.model == model and info.state is WorkerState.READY:
                    return info.id
        return None
    finally:
        client.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("flower")
    model = make_model(tmp / "tiny.gguf")
    server = EmbeddedRedis().start()
    procs: list[Proc] = []
    try:
        port = free_port()
        procs.append(
            Proc(
                "worker",
                ["worker", "--model", str(model)],
                tmp / "worker.log",
                CORRAL_REDIS_URL=server.url,
            )
        )
        procs.append(
            Proc(
                "flower",
                ["flower", "--redis-url", server.url, "--port", str(port)],
                tmp / "flower.log",
                CORRAL_FLOWER_USER=USER,
                CORRAL_FLOWER_PASSWORD=PASSWORD,
            )
        )
        worker_id = wait_for("worker ready", lambda: _ready_worker(server.url, "tiny"), procs, 40)
        running = Stack(server.url, f"http://127.0.0.1:{port}", worker_id, procs)

        def flower_sees_worker() -> bool | None:
            try:
                return worker_id in running.api("/api/workers?refresh=1").json() or None
            except (httpx.HTTPError, ValueError):
                return None

        wait_for("flower lists the worker", flower_sees_worker, procs, 30)
        yield running
    finally:
        try:
            for proc in reversed(procs):
                proc.stop()
            # The worker stops its llama-server (its own session) on the way out.
            leftovers = processes_using(str(tmp))
            for proc in leftovers:
                proc.kill()
            assert not leftovers, f"left running: {[p.info['cmdline'] for p in leftovers]}"
        finally:
            server.stop()


def _producer(redis_url: str) -> Celery:
    app = Celery("test-producer", set_as_current=False)
    app.conf.update(celery_config(Settings(), redis_url=redis_url))
    return app


def _send(redis_url: str, sends: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
    """Publish `corral.infer` tasks to the given queues, as the gateway does."""
    app = _producer(redis_url)
    try:
        return [app.send_task(redis_keys.INFER_TASK, args=[p], queue=q).id for q, p in sends]
    finally:
        app.close()


def test_flower_requires_basic_auth(stack: Stack) -> None:
    assert stack.api("/api/workers", auth=None).status_code == 401
    assert stack.api("/api/workers", auth=(USER, "wrong")).status_code == 401
    assert stack.api("/api/workers").status_code == 200
    # Open to the container healthcheck in docker-compose.yml, which has no credentials.
    assert stack.api("/healthcheck", auth=None).text == "OK"


def test_flower_lists_the_worker_and_its_queues(stack: Stack) -> None:
    info = stack.api(f"/api/workers?workername={stack.worker_id}").json()[stack.worker_id]
    consumed = {q["name"] for q in info["active_queues"]}
    # the model's shared queues, its own affinity queues (prompt-cache hits) and the
    # worker's private one (never published to)
    expected = {*redis_keys.consumed_queues("tiny", stack.worker_id)}
    assert consumed == expected | {redis_keys.worker_queue(stack.worker_id)}


def test_queue_lengths_show_every_model_queue_and_its_depth(stack: Stack) -> None:
    """Tasks for a model no worker holds wait in queues no worker reports: Flower still
    shows them, from the catalog (a gateway announced the model)."""
    client = redis.Redis.from_url(stack.redis_url)
    try:
        ghost = ModelConfig(model_path=Path(f"/models/{GHOST}.gguf"))
        client.hset(redis_keys.CATALOG, GHOST, ghost.model_dump_json())
    finally:
        client.close()
    low, high = (
        redis_keys.queue_name(GHOST, Priority.LOW),
        redis_keys.queue_name(GHOST, Priority.HIGH),
    )
    _send(stack.redis_url, [(low, {})] * 3 + [(high, {})] * 2)

    lengths = stack.api("/api/queues/length").json()["active_queues"]
    depth = {q["name"]: q["messages"] for q in lengths}
    assert depth[low] == 3 and depth[high] == 2
    assert depth[redis_keys.queue_name(GHOST, Priority.NORMAL)] == 0
    for queue in redis_keys.worker_queues("tiny"):  # the worker's queues, idle
        assert depth[queue] == 0


def test_flower_lists_inference_tasks(stack: Stack) -> None:
    """Task events reach Flower: sent by the producer, received and run by the worker."""
    job = Job(
        kind=JobKind.CHAT,
        model="tiny",
        body={"messages": []},
        priority=Priority.LOW,
        channel=redis_keys.channel("flower-test", "r1"),
        deadline=time.time() - 1,  # dropped unrun
    )
    waiting_id, run_id = _send(
        stack.redis_url,
        [
            (redis_keys.queue_name(GHOST, Priority.LOW), {}),
            (redis_keys.queue_name("tiny", Priority.LOW), job.model_dump(mode="json")),
        ],
    )

    def task(task_id: str, done: bool) -> dict[str, Any] | None:
        found = stack.api("/api/tasks").json().get(task_id)
        if found is None or (done and found["state"] not in states.READY_STATES):
            return None
        return dict(found)

    waiting = wait_for("flower lists the queued task", lambda: task(waiting_id, False), [], 10)
    assert waiting["name"] == redis_keys.INFER_TASK and not waiting.get("worker")
    assert waiting["state"] == states.PENDING  # sent, waiting in its queue
    ran = wait_for("flower lists the task the worker ran", lambda: task(run_id, True), [], 15)
    assert ran["name"] == redis_keys.INFER_TASK
    assert ran["worker"] == stack.worker_id
    assert ran["received"] and ran["started"]  # the worker's task events


@pytest.mark.slow
def test_flower_unauthenticated_on_loopback(tmp_path: Path) -> None:
    """--unauthenticated serves the UI on loopback; Flower keeps its REST API closed unless
    its own FLOWER_UNAUTHENTICATED_API is set."""
    with EmbeddedRedis() as server:
        port = free_port()
        proc = Proc(
            "flower",
            ["flower", "--redis-url", server.url, "--port", str(port), "--unauthenticated"],
            tmp_path / "flower.log",
        )
        try:
            url = f"http://127.0.0.1:{port}"

            def up() -> int | None:
                try:
                    return httpx.get(f"{url}/healthcheck", timeout=2).status_code
                except httpx.HTTPError:
                    return None

            assert wait_for("flower up", up, [proc], 20) == 200
            assert httpx.get(f"{url}/workers", timeout=5).status_code == 200
            assert httpx.get(f"{url}/api/workers", timeout=5).status_code == 401
        finally:
            proc.stop()

"""Helpers for tests that run real parts: processes, readiness, the worker registry."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import redis

from common import redis_keys
from common.net import free_port
from common.registry import WorkerInfo
from corral.procs import Child
from corral.redis_server import EmbeddedRedis, valkey_binary
from corral.tinymodel import make_model

_CLIENTS: list[openai.OpenAI] = []  # closed at the end of the session (conftest)


def openai_client(
    base_url: str, api_key: str = "unused", timeout: float | openai.NotGiven = openai.NOT_GIVEN
) -> openai.OpenAI:
    """The official client on `base_url` (no retries: a test sees the first answer). Kept
    until the session ends and closed then: a client collected with a keep-alive socket
    still open is a ResourceWarning, which this suite turns into an error at exit."""
    made = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout)
    _CLIENTS.append(made)
    return made


def close_clients() -> None:
    while _CLIENTS:
        _CLIENTS.pop().close()


def alive(pid: int) -> bool:
    """True while `pid` is a live, non-zombie process."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_for(check: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def corral_child(name: str, args: list[str], log: Path, **env: str) -> Child:
    """`python -m corral ARGS` as a supervised child logging to `log`."""
    base = {"CORRAL_LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1"}
    return Child(name, [sys.executable, "-m", "corral", *args], {**base, **env}, log=log)


def wait_healthy(base_url: str, workers: int, timeout: float = 60.0) -> None:
    def ready() -> bool:
        try:
            return (
                int(httpx.get(f"{base_url}/health", timeout=1).json()["ready_workers"]) >= workers
            )
        except (httpx.HTTPError, ValueError, KeyError):
            return False

    if not wait_for(ready, timeout, 0.1):
        raise TimeoutError(f"{base_url} did not report {workers} worker(s) in {timeout}s")


def wait_ready(
    redis_url: str, pids: list[int], timeout: float = 60.0, states: tuple[str, ...] = ("ready",)
) -> None:
    """Until the workers with these process ids are registered and ready (or in `states`:
    a worker started without a model waits `empty`)."""

    def ready() -> bool:
        up = {w.pid for w in workers(redis_url) if w.state in states}
        return set(pids) <= up

    if not wait_for(ready, timeout, 0.1):
        raise TimeoutError(f"workers {pids} not ready in {timeout}s")


def workers(redis_url: str, model: str | None = None) -> list[WorkerInfo]:
    """Live registry entries, optionally for one model."""
    client = redis.Redis.from_url(redis_url)
    try:
        out = []
        for wid in client.smembers(redis_keys.WORKERS):
            raw = client.get(redis_keys.worker_key(redis_keys.text(wid)))
            if raw is not None:
                info = WorkerInfo.model_validate_json(raw)
                if model is None or info.model == model:
                    out.append(info)
        return out
    finally:
        client.close()


HI = [{"role": "user", "content": "hi"}]


class Call(threading.Thread):
    """One chat completion in the background (`ignore_eos`: exactly `max_tokens`),
    remembering what came back and when it ended."""

    def __init__(self, base_url: str, model: str, stream: bool, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.url = f"{base_url}/v1/chat/completions"
        self.body = {
            "model": model,
            "messages": HI,
            "max_tokens": max_tokens,
            "stream": stream,
            "ignore_eos": True,
        }
        self.request_id = ""
        self.status = 0
        self.lines: list[str] = []  # a stream's `data:` lines
        self.result: dict[str, Any] = {}  # a reply's body
        self.ended_at = 0.0
        self.start()

    def run(self) -> None:
        with httpx.stream("POST", self.url, json=self.body, timeout=90) as resp:
            self.request_id = resp.headers["x-request-id"]
            self.status = resp.status_code
            if self.body["stream"]:
                self.lines = [x for x in resp.iter_lines() if x.startswith("data:")]
            else:
                self.result = json.loads(resp.read())
        self.ended_at = time.monotonic()


def busy_slots(upstream: str) -> int:
    """How many llama-server slots are generating right now (its `/slots`)."""
    slots = httpx.get(f"{upstream}/slots", timeout=2).json()
    return sum(1 for s in slots if s.get("is_processing"))


def tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def dump(obj: object) -> str:
    return json.dumps(obj, indent=1, default=str)


def descendants(pid: int) -> list[int]:
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def shell_script(path: Path, body: str) -> Path:
    """An executable /bin/sh script at `path`: a stand-in llama-server that misbehaves."""
    path.write_text(f"#!/bin/sh\n{body}")
    path.chmod(0o755)
    return path


def env_without_corral() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}


def slow_model(path: Path) -> Path:
    """A generated model for tests that need a generation to last: trained for a long
    context (llama-server caps a slot at the training context, so 8000 tokens asked of the
    default tiny model end after 2048) and large enough to decode only a few hundred tokens
    a second on one CPU thread (the default tiny model decodes thousands a second on a fast
    core, and a 256-wide one two thousand: a long request ended before the test was done
    with it). Serve it with `--ctx-size` of 16384 or more."""
    return make_model(path, n_embd=384, n_layer=6, n_ff=1024, ctx=32768)


class Blocker:
    """A long streaming generation holding the model's only slot until cancelled. Serve a
    `slow_model`, or the generation may end before the test is done with the slot."""

    def __init__(self, base_url: str, model: str, key: str | None = None, **extra: Any) -> None:
        self.base_url = base_url
        self.model = model
        self.extra = extra  # more body fields (e.g. `prompt_cache_key`)
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.request_id = ""
        self.events: list[str] = []
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Blocker:
        self._thread.start()
        assert self._started.wait(30), "the blocker never started"
        return self

    def _run(self) -> None:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 8000,
            "stream": True,
            "ignore_eos": True,
            **self.extra,
        }
        with httpx.stream(
            "POST",
            f"{self.base_url}/v1/chat/completions",
            json=body,
            headers=self.headers,
            timeout=60,
        ) as resp:
            self.request_id = resp.headers["x-request-id"]
            self._started.set()
            self.events = [line for line in resp.iter_lines() if line.startswith("data:")]

    def join(self, timeout: float) -> bool:
        """Wait for the stream to end by itself; True if it did."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def cancel(self) -> None:
        url = f"{self.base_url}/v1/requests/{self.request_id}/cancel"
        r = httpx.post(url, headers=self.headers)
        assert r.status_code == 200, r.text

    def __exit__(self, *exc: object) -> None:
        if self._thread.is_alive():
            self.cancel()
            self._thread.join(10)


class SentinelSet:
    """A Valkey primary, optionally a replica of it, and sentinels watching them (quorum:
    a majority), all on loopback ports. `password` protects the primary and the replica
    (the sentinels use it too); `sentinel_password` protects the sentinels."""

    def __init__(
        self,
        root: Path,
        master: str,
        *,
        sentinels: int = 3,
        replica: bool = True,
        down_after_ms: int = 1000,
        password: str | None = None,
        sentinel_password: str | None = None,
    ) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.master, self.password = root, master, password
        auth = ["--requirepass", password, "--masterauth", password] if password else []
        # Diskless sync at once: a replica is in sync within milliseconds of its start.
        # Each in a directory of its own: a replica writes the primary's snapshot there.
        self.primary = EmbeddedRedis(
            root / "primary", args=["--repl-diskless-sync-delay", "0", *auth]
        )
        follow = ["--replicaof", "127.0.0.1", str(self.primary.port), *auth]
        self.replica = EmbeddedRedis(root / "replica", args=follow) if replica else None
        self.ports = [free_port() for _ in range(sentinels)]
        lines = [
            f"sentinel monitor {master} 127.0.0.1 {self.primary.port} {sentinels // 2 + 1}",
            f"sentinel down-after-milliseconds {master} {down_after_ms}",
            f"sentinel failover-timeout {master} 10000",
            *([f"sentinel auth-pass {master} {json.dumps(password)}"] if password else []),
            *([f"requirepass {json.dumps(sentinel_password)}"] if sentinel_password else []),
        ]
        self._sentinel_password = sentinel_password
        self.sentinels = [self._sentinel(i, port, lines) for i, port in enumerate(self.ports)]
        # kombu's form: the master's password and database on the first URL only.
        creds = f":{password}@" if password else ""
        hosts = [f"127.0.0.1:{p}" for p in self.ports]
        self.url = ";".join(
            f"sentinel://{creds}{h}/0" if i == 0 else f"sentinel://{h}" for i, h in enumerate(hosts)
        )

    def _sentinel(self, i: int, port: int, lines: list[str]) -> Child:
        conf = self.root / f"sentinel{i}.conf"  # sentinels rewrite their config: a file each
        conf.write_text("\n".join([f"port {port}", "bind 127.0.0.1", f"dir {self.root}", *lines]))
        argv = [str(valkey_binary()), str(conf), "--sentinel"]
        return Child(f"sentinel{i}", argv, log=self.root / f"sentinel{i}.log")

    def start(self) -> SentinelSet:
        try:
            self.primary.start()
            if self.replica is not None:
                self.replica.start()
            for child in self.sentinels:
                child.start()
            if not wait_for(self._watching, 15, 0.1):
                raise TimeoutError(f"sentinels not watching in 15 s\n{self.logs()}")
        except BaseException:
            self.stop()
            raise
        return self

    def _sentinel_client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, password=self._sentinel_password, socket_timeout=1)

    def _watching(self) -> bool:
        """The replica is in sync, and every sentinel knows it and the other sentinels."""
        try:
            if self.replica is not None:
                with redis.Redis(
                    port=self.replica.port, password=self.password, socket_timeout=1
                ) as r:
                    if r.info("replication").get("master_link_status") != "up":
                        return False
            for port in self.ports:
                with self._sentinel_client(port) as s:
                    state = s.sentinel_master(self.master)
                replicas = 1 if self.replica is not None else 0
                if (
                    state["num-slaves"] < replicas
                    or state["num-other-sentinels"] < len(self.ports) - 1
                ):
                    return False
        except redis.RedisError:
            return False
        return True

    def master_port(self) -> int:
        with self._sentinel_client(self.ports[0]) as s:
            _, port = s.sentinel_get_master_addr_by_name(self.master)
        return int(port)

    def logs(self) -> str:
        logs = sorted(self.root.rglob("*.log"))
        return "\n".join(f"--- {p.relative_to(self.root)}\n{tail(p, 15)}" for p in logs)

    def stop(self) -> None:
        for child in self.sentinels:
            child.stop(grace=2)
        if self.replica is not None:
            self.replica.stop()
        self.primary.stop()

    def __enter__(self) -> SentinelSet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

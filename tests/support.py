"""Helpers for tests that run real parts: processes, readiness, the worker registry."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import psutil
import redis

from common import redis_keys
from common.registry import WorkerInfo
from corral.procs import Child
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

    def __init__(self, base_url: str, model: str, key: str | None = None) -> None:
        self.base_url = base_url
        self.model = model
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

    def cancel(self) -> None:
        url = f"{self.base_url}/v1/requests/{self.request_id}/cancel"
        r = httpx.post(url, headers=self.headers)
        assert r.status_code == 200, r.text

    def __exit__(self, *exc: object) -> None:
        if self._thread.is_alive():
            self.cancel()
            self._thread.join(10)

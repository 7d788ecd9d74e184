"""`corral up`: the whole cluster on this machine.

An embedded Valkey (unless `CORRAL_REDIS_URL` is set), one gateway and one worker per
model, each a child process in its own session; demo models are generated when none is
configured. Ctrl-C or SIGTERM stops the workers (each stops its llama-server), then the
gateway, then Valkey; a child that dies on its own brings the rest down with a message.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import yaml

from common.net import is_loopback
from common.settings import ModelConfig, Settings
from corral.procs import Child
from corral.redis_server import EmbeddedRedis
from gateway.tenancy.exposure import exposure_problem
from workers.hardware.budget import gpu_budget_mb
from workers.hardware.gpu import GPUInfo, gpus_or_none

log = logging.getLogger(__name__)

DEMO_NOTE = (
    "No model configured: serving two generated random-weight DEMO models "
    "(corral-demo for chat/completions, corral-demo-embed for embeddings). "
    "They answer with gibberish; pass --model PATH (a GGUF file) for a real one."
)


def collect_models(
    settings: Settings, models: list[str], embedding_models: list[str], slots: int | None
) -> dict[str, ModelConfig]:
    """The configured models plus those named on the command line; demo ones if none."""
    found = dict(settings.models)
    for path, embedding in [(m, False) for m in models] + [(m, True) for m in embedding_models]:
        p = Path(path).expanduser().resolve()
        if not p.is_file():
            raise SystemExit(f"corral up: model file not found: {p}")
        with p.open("rb") as f:
            if (head := f.read(4)) != b"GGUF":
                raise SystemExit(f"corral up: {p} is not a GGUF file (it starts with {head!r})")
        found[p.stem] = ModelConfig(model_path=p, embedding=embedding)
    if not found:
        from corral.tinymodel import ensure_demo_models

        chat, embed = ensure_demo_models(settings.data_dir)
        print(DEMO_NOTE, flush=True)
        found = {
            "corral-demo": ModelConfig(model_path=chat),
            "corral-demo-embed": ModelConfig(model_path=embed, embedding=True),
        }
    if slots:
        found = {a: m.model_copy(update={"parallel": slots}) for a, m in found.items()}
    return {a: settings.resolved(m) for a, m in found.items()}


def address_problem(host: str, port: int) -> str | None:
    """Why the gateway could not listen on `host:port` (taken by another `corral up`, say),
    or None. Bound the way uvicorn binds (SO_REUSEADDR), so a port in TIME_WAIT is free."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        return f"cannot listen on {host}:{port}: {exc.strerror}"
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as exc:
            return f"cannot listen on {host}:{port}: {exc.strerror} (pick another with --port)"
    return None


@contextlib.contextmanager
def claim_data_dir(data_dir: Path) -> Iterator[int | None]:
    """Hold `data_dir` for this run (an exclusive lock on a file in it, released when the
    process ends however it ends); yields None, or the pid of the `corral up` that holds
    it: two runs on one data dir would share one Valkey append-only file."""
    run_dir = data_dir / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "corral-up.lock").open("a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            yield int(lock.read().strip() or 0)
            return
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        yield None


def gpu_flags(aliases: list[str], gpus: list[GPUInfo]) -> dict[str, list[str]]:
    """Each model's worker on the GPUs NVML found, in turn, with its share of
    that GPU's budget (workers sharing a GPU split it: each would take it all); no GPU:
    no flags, the CPU."""
    flags: dict[str, list[str]] = {alias: [] for alias in aliases}
    if not gpus:
        return flags
    sharing: dict[int, list[str]] = {}
    for i, alias in enumerate(aliases):
        sharing.setdefault(i % len(gpus), []).append(alias)
    for slot, names in sharing.items():
        gpu = gpus[slot]
        each = max(gpu_budget_mb(gpu.total_mb)[0] // len(names), 1)
        for alias in names:
            flags[alias] = ["--gpu", str(gpu.index), "--vram-budget", f"{each}MiB"]
    return flags


def write_run_config(settings: Settings, models: dict[str, ModelConfig], url: str) -> Path:
    """The effective config every child reads: one source of truth for this run."""
    run_dir = settings.data_dir / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    # No secrets in the file: they reach the children in their environment.
    data: dict[str, Any] = settings.model_dump(
        mode="json", exclude={"models", "redis_url", "admin_key", "redis_sentinel_password"}
    )
    data["redis_url"] = url
    data["models"] = {a: m.model_dump(mode="json") for a, m in models.items()}
    path = run_dir / "corral-up.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class Cluster:
    def __init__(self, settings: Settings, models: dict[str, ModelConfig]) -> None:
        self.settings = settings
        self.models = models
        self.redis: EmbeddedRedis | None = None
        self.children: list[Child] = []
        self._stop = threading.Event()

    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        try:
            self._start()
            if not self._stop.is_set():
                self._announce()
            return self._watch()
        finally:
            self.shutdown()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stop.set()

    def _start(self) -> None:
        url = self.settings.redis_url
        if not url:
            self.redis = EmbeddedRedis(self.settings.data_dir / "redis").start()
            url = self.redis.url
            log.info("embedded valkey at %s", url)
        if not is_loopback(self.settings.host):  # loopback may run open (the gateway says so)
            problem = exposure_problem(self.settings.model_copy(update={"redis_url": url}))
            if problem:  # API keys live in Redis: checked once it runs, before the workers
                raise SystemExit(f"corral up: {problem}")
        config = write_run_config(self.settings, self.models, url)
        exe = [sys.executable, "-m", "corral"]
        # The run config holds the effective settings (file, environment, flags): a CORRAL_*
        # variable passed on to the children would outrank it there and undo a flag
        # (CORRAL_PORT against --port, say). Only the run's own go on.
        env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
        env |= {"CORRAL_REDIS_URL": url, "CORRAL_CONFIG": str(config)}
        if self.settings.admin_key is not None:
            env["CORRAL_ADMIN_KEY"] = self.settings.admin_key.get_secret_value()
        if self.settings.redis_sentinel_password is not None:
            secret = self.settings.redis_sentinel_password.get_secret_value()
            env["CORRAL_REDIS_SENTINEL_PASSWORD"] = secret
        self.children.append(
            Child("gateway", [*exe, "gateway", "--config", str(config)], env, inherit=False)
        )
        found = gpus_or_none()
        listed = ", ".join(f"{g.index} {g.name} {g.total_mb} MiB" for g in found)
        log.info("GPUs (NVML): %s", listed or "none: workers on the CPU")
        devices = gpu_flags(list(self.models), found)
        for alias in self.models:
            argv = [*exe, "worker", "--config", str(config), "--model", alias, "--no-banner"]
            argv += devices[alias]
            self.children.append(Child(f"worker {alias}", argv, env, inherit=False))
        for child in self.children:
            child.start()
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.settings.load_timeout
        url = f"{self.settings.local_url()}/health"
        while not self._stop.is_set():
            self._check_children()
            try:
                health = httpx.get(url, timeout=1).json()
                if health.get("ready_workers", 0) >= len(self.models):
                    return
            except (httpx.HTTPError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise SystemExit("corral up: the cluster did not become ready in time")
            self._stop.wait(0.2)

    def _announce(self) -> None:
        base = f"{self.settings.local_url()}/v1"
        chat = next((a for a, m in self.models.items() if not m.embedding), None)
        print(f"\nCorral is up: {base}", flush=True)
        print(f"  models: {', '.join(self.models)}", flush=True)
        if chat:
            print(
                f"  try:    curl {base}/chat/completions -H 'Content-Type: application/json' "
                f'-d \'{{"model": "{chat}", "messages": [{{"role": "user", "content": "Hi"}}]}}\'',
                flush=True,
            )
        print("  stop:   Ctrl-C\n", flush=True)

    def _check_children(self) -> None:
        for child in self.children:
            rc = child.poll()
            if rc is not None:
                raise SystemExit(f"corral up: {child.name} exited (rc={rc}); stopping everything")

    def _watch(self) -> int:
        while not self._stop.wait(0.5):
            self._check_children()
        return 0

    def shutdown(self) -> None:
        # Workers first (each stops its llama-server), then the gateway, then Redis.
        workers = [c for c in self.children if c.name.startswith("worker")]
        for child in workers:
            child.send_signal(signal.SIGTERM)  # all at once: each stops its llama-server
        for child in [*workers, *(c for c in self.children if c not in workers)]:
            child.stop(grace=10.0)
        self.children.clear()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
        log.info("corral up: stopped")

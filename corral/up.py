"""`corral up`: the whole cluster on this machine, as a model manager.

An embedded Valkey (unless `CORRAL_REDIS_URL` is set), one gateway, and on each device (each
GPU NVML finds, else the CPU) `max_models_per_device` floating workers that share the
device's memory: preloaded models are placed at start, every other configured or
discovered model when a request names it, unloaded after `idle_ttl`, evicted least
recently used first when a newcomer needs room. Demo models are generated when there is
nothing to serve. Every child runs in its own session and is started again if it dies
(`corral.supervise`); only the gateway failing for good, or Valkey, stops the run. Ctrl-C
or SIGTERM stops the workers (each stops its llama-server), then the gateway, then Valkey.
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

from common import redis_keys
from common.discovery import discover
from common.net import is_loopback
from common.redis_conn import RedisTarget
from common.settings import ModelConfig, Settings
from corral import local
from corral.banner import banner
from corral.procs import Child
from corral.redis_server import EmbeddedRedis
from corral.supervise import Supervised, Supervisor
from gateway.tenancy.exposure import exposure_problem
from workers.hardware.budget import resolve_budget
from workers.hardware.gpu import GPUInfo, gpus_or_none

log = logging.getLogger(__name__)

DEMO_NOTE = (
    "No model configured: serving two generated random-weight DEMO models "
    "(corral-demo for chat/completions, corral-demo-embed for embeddings). "
    "They answer with gibberish; pass --model PATH (a GGUF file) for a real one."
)

DEMO_MODELS = ("corral-demo", "corral-demo-embed")  # the file stems `ensure_demo_models` writes


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
        found[p.stem] = ModelConfig(model_path=p, embedding=embedding, preload=True)
    models_dir = settings.models_dir or settings.data_dir / "models"
    # Nothing but the demo files of an earlier run: the demo again (preloaded, the
    # embedding one as such), not two plain models on demand.
    if not found and set(discover(models_dir)) <= set(DEMO_MODELS):
        from corral.tinymodel import ensure_demo_models

        chat, embed = ensure_demo_models(settings.data_dir)
        print(DEMO_NOTE, flush=True)
        chat_alias, embed_alias = DEMO_MODELS
        found = {
            chat_alias: ModelConfig(model_path=chat, preload=True),
            embed_alias: ModelConfig(model_path=embed, embedding=True, preload=True),
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
    lock_path = data_dir / local.LOCK_FILE
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            yield int(lock.read().strip() or 0)
            return
        # An earlier run's config names a Valkey that is gone: no client may read it as ours.
        (data_dir / local.RUN_CONFIG).unlink(missing_ok=True)
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        yield None


def worker_flags(settings: Settings, gpus: list[GPUInfo], budget: str | None) -> list[list[str]]:
    """The floating workers' flags: `max_models_per_device` per GPU NVML found, sharing
    that GPU's memory (each measures it), else as many on the CPU sharing `budget` (the
    host's memory Corral may use; default: half of what is available now, decided once
    here so that every worker agrees)."""
    per = settings.max_models_per_device
    if gpus:
        extra = ["--vram-budget", budget] if budget else []
        return [["--gpu", str(g.index), *extra] for g in gpus for _ in range(per)]
    ram = budget or f"{resolve_budget()[0]}MiB"
    return [["--ram-budget", ram] for _ in range(per)]


def write_run_config(settings: Settings, models: dict[str, ModelConfig], url: str) -> Path:
    """The effective config every child reads: one source of truth for this run."""
    path = settings.data_dir / local.RUN_CONFIG
    path.parent.mkdir(parents=True, exist_ok=True)
    # No secrets in the file: they reach the children in their environment.
    data: dict[str, Any] = settings.model_dump(
        mode="json", exclude={"models", "redis_url", "admin_key", "redis_sentinel_password"}
    )
    data["redis_url"] = url
    data["models"] = {a: m.model_dump(mode="json") for a, m in models.items()}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class Cluster:
    def __init__(
        self,
        settings: Settings,
        models: dict[str, ModelConfig],
        budget: str | None = None,
        key_made: bool = False,
    ) -> None:
        self.settings = settings
        self.models = models
        self.budget = budget  # --ram-budget / --vram-budget: the device's memory for Corral
        self.key_made = key_made  # the local admin key is new: the banner shows it, once
        self.url = settings.redis_url or ""  # the run's Redis, once started
        self.redis: EmbeddedRedis | None = None
        self.children: list[Child] = []
        self._supervisor = Supervisor([])
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
            forget_other_models(
                self.settings, url, set(self.models)
            )  # this run's Valkey: its config rules
        if not is_loopback(self.settings.host):  # loopback may run open (the gateway says so)
            problem = exposure_problem(self.settings.model_copy(update={"redis_url": url}))
            if problem:  # API keys live in Redis: checked once it runs, before the workers
                raise SystemExit(f"corral up: {problem}")
        self.url = url
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
        gateway = Child("gateway", [*exe, "gateway", "--config", str(config)], env, inherit=False)
        watched = [Supervised(gateway, essential=True)]
        found = gpus_or_none()
        listed = ", ".join(f"{g.index} {g.name} {g.total_mb} MiB" for g in found)
        log.info("GPUs (NVML): %s", listed or "none: workers on the CPU")
        slots = ["--slots", str(worker_slots(self.models))]
        for i, flags in enumerate(worker_flags(self.settings, found, self.budget), start=1):
            argv = [*exe, "worker", "--config", str(config), "--no-banner", *slots, *flags]
            watched.append(Supervised(Child(f"worker {i}", argv, env, inherit=False)))
        self.children = [w.child for w in watched]
        self._supervisor = Supervisor(watched)
        for child in self.children:
            child.start()
        self._wait_ready()

    def _wait_ready(self) -> None:
        """Until the gateway answers and every preloaded model is ready (or failed)."""
        deadline = time.monotonic() + self.settings.load_timeout
        wanted = {a for a, m in self.models.items() if self.settings.preloaded(a, m)}
        while not self._stop.is_set():
            reason = self._supervisor.check()
            if reason:
                raise SystemExit(f"corral up: {reason}; stopping everything")
            if self._settled(wanted):
                return
            if time.monotonic() > deadline:
                raise SystemExit("corral up: the cluster did not become ready in time")
            self._stop.wait(0.2)

    def _settled(self, wanted: set[str]) -> bool:
        """Whether the gateway answers and each of `wanted` is ready or failed."""
        key = self.settings.admin_key
        headers = {"Authorization": f"Bearer {key.get_secret_value()}"} if key else {}
        try:
            reply = httpx.get(
                f"{self.settings.local_url()}/v1/models/status", headers=headers, timeout=1
            )
            if reply.status_code in (401, 403):  # user keys and no admin key: health only
                return bool(httpx.get(f"{self.settings.local_url()}/health", timeout=1).is_success)
            models = reply.json()["models"]
        except (httpx.HTTPError, ValueError, KeyError):
            return False
        return all(models.get(a, {}).get("status") in ("ready", "failed") for a in wanted)

    def _announce(self) -> None:
        print(banner(self.settings, self.models, self.url, self.key_made), flush=True)

    def _watch(self) -> int:
        while not self._stop.wait(0.5):
            reason = self._supervisor.check()
            if reason:
                print(f"corral up: {reason}; stopping everything", file=sys.stderr, flush=True)
                return 1
            if self.redis is not None and not self.redis.alive():
                print("corral up: Valkey stopped; stopping everything", file=sys.stderr, flush=True)
                return 1
        return 0

    def shutdown(self) -> None:
        # Workers first (each stops its llama-server), then the gateway, then Redis.
        workers = [c for c in self.children if c.name.startswith("worker")]
        for child in workers:
            child.send_signal(signal.SIGTERM)  # all at once: each drains, stops its llama-server
        grace = self.settings.drain_timeout + 10.0  # a worker's drain, then its own stop
        for child in workers:
            child.stop(grace=grace, sig=None)  # signalled once: Celery says "Warm shutdown" once
        for child in self.children:
            if child not in workers:
                child.stop(grace=10.0)
        self.children.clear()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
        log.info("corral up: stopped")


def worker_slots(models: dict[str, ModelConfig]) -> int:
    """The slots of the floating workers: the most `parallel` any model asks for."""
    return max((m.parallel for m in models.values()), default=2)


def forget_other_models(settings: Settings, url: str, keep: set[str]) -> None:
    """The catalog of this run's own Valkey holds this run's models only: an earlier run's
    config, or a worker of an earlier run, announced the rest. (With a shared Redis the
    gateways prune what nobody announces any more, after a while.)"""
    client = RedisTarget.of(settings, url).client(decode_responses=True)
    try:
        gone = [str(a) for a in client.hkeys(redis_keys.CATALOG) if str(a) not in keep]
        if gone:
            pipe = client.pipeline(transaction=False)
            pipe.hdel(redis_keys.CATALOG, *gone)
            pipe.zrem(redis_keys.CATALOG_SEEN, *gone)
            pipe.execute()
            log.info("models of an earlier run left the catalog: %s", ", ".join(sorted(gone)))
    finally:
        client.close()

"""`corral worker`: one process = one GPU (or a share of it, or the CPU) + one memory budget +
one engine child (llama-server, or another) holding at most one model at a time + a fixed
number of slots (the Celery pool's concurrency).

Threads of the main process: Celery's consumer (the main thread), the model manager
(`workers.models.manager`, owner of the engine child, told what to load through Redis), the
heartbeat (the registry entry). Started with `--model X`, the worker loads X before it
consumes anything and keeps it (pinned), as a one-model worker always did; started without,
it waits empty until a gateway places a model on it.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

from celery.exceptions import SecurityWarning

from common import redis_keys
from common.devices import cpu_device
from common.errors import LlamaServerError
from common.net import announced_host, free_port
from common.redis_conn import RedisTarget
from common.registry import WorkerInfo, WorkerState
from common.settings import ModelConfig, Settings
from workers.consumer.celery_app import configure_app
from workers.consumer.drain import Drain
from workers.consumer.queues import QueueControl
from workers.engine.binary import resolve_binary
from workers.hardware import gpu as gpus
from workers.hardware.budget import resolve_budget
from workers.hardware.ledger import DeviceLedger
from workers.metrics_server import WorkerMetrics
from workers.models.heartbeat import Heartbeat
from workers.models.manager import Manager, Parts, WorkerSpec
from workers.models.reporter import Reporter
from workers.task import runtime, tasklog

log = logging.getLogger(__name__)

DEFAULT_SLOTS = 2


def new_worker_id(alias: str | None = None) -> str:
    return f"{alias or 'worker'}-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"


@dataclass(frozen=True)
class WorkerOptions:
    """What `corral worker` was asked for on its command line."""

    slots: int | None = None
    gpu: int | None = None
    vram_budget: str | None = None  # the device's budget (default: measured)
    ram_budget: str | None = None
    device: str | None = None  # the device's ledger name (default: its GPU's, or the host's)
    worker_id: str | None = None
    banner: bool = True


def run_worker(
    settings: Settings,
    alias: str | None = None,
    model: ModelConfig | None = None,
    options: WorkerOptions | None = None,
) -> None:
    """Register, preload `alias` if given, then consume until told to stop."""
    opts = options or WorkerOptions()
    redis_url = settings.require_redis_url()
    if alias is not None and model is not None:
        model = settings.resolved(model)
        if model.is_gguf and not model.model_path.is_file():
            raise FileNotFoundError(f"model file not found for {alias!r}: {model.model_path}")
    spec = _spec(settings, alias, model, opts)
    target = RedisTarget.of(settings, redis_url)
    client = target.client()
    if alias is not None and model is not None:
        pipe = client.pipeline(transaction=False)  # every gateway knows it, from now
        pipe.hset(redis_keys.CATALOG, alias, model.model_dump_json())
        pipe.zadd(redis_keys.CATALOG_SEEN, {alias: time.time()})
        pipe.execute()
    tasklog.install()  # the request id on every log line of a task
    manager: Manager | None = None
    ledger = DeviceLedger(client, spec.device, spec.worker_id, spec.budget_mb)
    metrics = WorkerMetrics(
        lambda: hb.info,
        lambda: manager.child_pid() if manager else None,
        lambda: manager.engine_page() if manager else None,
    )
    metrics.serve(settings.worker_metrics_host, settings.worker_metrics_port)
    initial = [redis_keys.worker_queue(spec.worker_id)]
    initial += redis_keys.consumed_queues(alias, spec.worker_id) if alias else []
    queues = QueueControl(configure_app(settings, redis_url), spec.worker_id, initial)
    info = WorkerInfo(
        id=spec.worker_id,
        host=socket.gethostname(),
        pid=os.getpid(),
        slots=spec.slots,
        state=WorkerState.STARTING,
        gpu="cpu" if spec.gpu is None else str(spec.gpu),
        device=spec.device,
        metrics_port=metrics.port,
        # the address it listens on, as Prometheus reaches it (`GET /metrics/targets`)
        metrics_host=announced_host(settings.worker_metrics_host, target.host),
        budget_mb=spec.budget_mb,
    )
    hb = Heartbeat(
        client,
        info,
        settings.heartbeat_interval,
        settings.heartbeat_ttl,
        sample=lambda: manager.sample() if manager else {},
        also=ledger.announce,
    )
    serving = runtime.Serving()  # before the pool forks: the children share it
    upstream = f"http://127.0.0.1:{spec.port}"
    runtime.configure(runtime.Runtime(settings, redis_url, spec.worker_id, upstream, serving))
    parts = Parts(
        settings, spec, client, Reporter(client, hb), queues, serving, ledger, metrics.model_loaded
    )
    manager = Manager(parts)
    Drain(client, spec.worker_id, settings.drain_timeout, manager.request_drain)
    hb.start()
    try:
        manager.start((alias, model) if alias is not None and model is not None else None)
        manager.wait_preloaded()
        _consume(settings, redis_url, initial, spec.slots, spec.worker_id, opts.banner)
    finally:
        manager.stop()
        hb.stop()
        metrics.stop()
        client.close()


def _spec(
    settings: Settings, alias: str | None, model: ModelConfig | None, opts: WorkerOptions
) -> WorkerSpec:
    """The worker's fixed facts: its id, slots, device and budget, the engine's port."""
    slots = opts.slots or (model.parallel if model else DEFAULT_SLOTS)
    worker_id = opts.worker_id or new_worker_id(alias)
    budget_mb, source = resolve_budget(
        vram_budget=opts.vram_budget, ram_budget=opts.ram_budget, gpu=opts.gpu
    )
    env: dict[str, str] = {}
    device = opts.device or cpu_device(socket.gethostname())
    if opts.gpu is not None:
        info = gpus.gpu(opts.gpu)  # fails clearly where NVML is absent
        log.info(
            "worker=%s gpu=%d name=%s total_mb=%d", worker_id, opts.gpu, info.name, info.total_mb
        )
        env = gpus.child_env(opts.gpu)
        device = opts.device or info.device
    spec = WorkerSpec(
        worker_id=worker_id,
        slots=slots,
        budget_mb=budget_mb,
        port=free_port(),
        binary=_llama_server(settings),
        device=device,
        gpu=opts.gpu,
        env=env,
    )
    log.info(
        "worker=%s slots=%d device=%s budget_mb=%d (%s) port=%d",
        worker_id,
        slots,
        device,
        budget_mb,
        source,
        spec.port,
    )
    return spec


def _llama_server(settings: Settings) -> Path | None:
    """llama-server's binary, if this machine has one: a worker without one still serves
    models on other engines (a load of a llama-server model then fails, saying why)."""
    try:
        return resolve_binary(settings.llama_server)
    except LlamaServerError as exc:
        if settings.llama_server:  # named, and wrong: say so now
            raise
        log.warning("no llama-server here: %s; only models on other engines can load", exc)
        return None


def _consume(
    settings: Settings,
    redis_url: str,
    queues: list[str],
    slots: int,
    worker_id: str,
    banner: bool,
) -> None:
    app = configure_app(settings, redis_url)
    argv = [
        *(() if banner else ("--quiet",)),  # celery's own option: no startup banner
        "worker",
        "--queues",
        ",".join(queues),
        "--concurrency",
        str(slots),
        "--pool",
        "prefork",
        "--hostname",
        worker_id,
        "--loglevel",
        settings.log_level,
        "--without-gossip",
        "--without-mingle",
    ]
    log.info("worker=%s consuming queues=%s slots=%d", worker_id, ",".join(queues), slots)
    _one_line_if_root(worker_id)
    # Celery warns at each broker reconnect that it will cancel running tasks by default in
    # 6.0; Corral sets the behaviour it wants (`common.celery_config`).
    warnings.filterwarnings("ignore", message=r"\s*In Celery 5\.1 we introduced an optional")
    app.worker_main(argv)


def _one_line_if_root(worker_id: str) -> None:
    """Celery prints a seven-line `SecurityWarning` in each worker run as root (`corral up`
    as root in a VM or container, say), after Corral's own summary; one log line with the
    same advice is enough."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return
    warnings.filterwarnings("ignore", category=SecurityWarning)
    log.warning(
        "worker=%s runs as root: run workers as an unprivileged user where you can "
        "(the Docker images use uid 10001)",
        worker_id,
    )

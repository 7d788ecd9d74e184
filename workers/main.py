"""`corral worker`: one process = one GPU (or a share of it, or the CPU) + one memory budget +
one llama-server child holding at most one model at a time + a fixed number of slots (the
Celery pool's concurrency).

Threads of the main process: Celery's consumer (the main thread), the model manager
(`workers.models.manager`, owner of the llama-server child, told what to load through Redis), the
heartbeat (the registry entry). Started with `--model X`, the worker loads X before it
consumes anything and keeps it (pinned), as a one-model worker always did; started without,
it waits empty until a gateway places a model on it.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
import warnings

from celery.exceptions import SecurityWarning

from common import redis_keys
from common.net import free_port
from common.redis_conn import RedisTarget
from common.registry import WorkerInfo, WorkerState
from common.settings import ModelConfig, Settings
from workers.consumer.celery_app import configure_app
from workers.consumer.queues import QueueControl
from workers.hardware import gpu as gpus
from workers.hardware.budget import resolve_budget
from workers.llama.binary import resolve_binary
from workers.metrics_server import WorkerMetrics
from workers.models.heartbeat import Heartbeat
from workers.models.manager import Manager, WorkerSpec
from workers.models.reporter import Reporter
from workers.task import runtime, tasklog

log = logging.getLogger(__name__)

DEFAULT_SLOTS = 2


def new_worker_id(alias: str | None = None) -> str:
    return f"{alias or 'worker'}-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"


def run_worker(
    settings: Settings,
    alias: str | None = None,
    model: ModelConfig | None = None,
    *,
    slots: int | None = None,
    gpu: int | None = None,
    vram_budget: str | None = None,
    ram_budget: str | None = None,
    worker_id: str | None = None,
    banner: bool = True,
) -> None:
    """Register, preload `alias` if given, then consume until told to stop."""
    redis_url = settings.require_redis_url()
    slots = slots or (model.parallel if model else DEFAULT_SLOTS)
    worker_id = worker_id or new_worker_id(alias)
    budget_mb, source = resolve_budget(vram_budget=vram_budget, ram_budget=ram_budget, gpu=gpu)
    env: dict[str, str] = {}
    if gpu is not None:
        info = gpus.gpu(gpu)  # fails clearly where NVML is absent
        log.info("worker=%s gpu=%d name=%s total_mb=%d", worker_id, gpu, info.name, info.total_mb)
        env = gpus.child_env(gpu)
    if alias is not None and model is not None:
        model = settings.resolved(model)
        if not model.model_path.is_file():
            raise FileNotFoundError(f"model file not found for {alias!r}: {model.model_path}")
    spec = WorkerSpec(
        worker_id=worker_id,
        slots=slots,
        budget_mb=budget_mb,
        port=free_port(),
        binary=resolve_binary(settings.llama_server),
        gpu=gpu,
        env=env,
    )
    log.info(
        "worker=%s slots=%d budget_mb=%d (%s) port=%d",
        worker_id,
        slots,
        budget_mb,
        source,
        spec.port,
    )
    client = RedisTarget.of(settings, redis_url).client()
    if alias is not None and model is not None:
        client.hset(redis_keys.CATALOG, alias, model.model_dump_json())  # every gateway knows it
    tasklog.install()  # the request id on every log line of a task
    manager: Manager | None = None
    metrics = WorkerMetrics(lambda: hb.info, lambda: manager.child_pid() if manager else None)
    metrics.serve(settings.worker_metrics_host, settings.worker_metrics_port)
    initial = [redis_keys.worker_queue(worker_id)] + (
        redis_keys.worker_queues(alias) if alias else []
    )
    queues = QueueControl(configure_app(settings, redis_url), worker_id, initial)
    hb = Heartbeat(
        client,
        WorkerInfo(
            id=worker_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            slots=slots,
            state=WorkerState.STARTING,
            gpu="cpu" if gpu is None else str(gpu),
            metrics_port=metrics.port,
            budget_mb=budget_mb,
        ),
        settings.heartbeat_interval,
        settings.heartbeat_ttl,
        sample=lambda: manager.sample() if manager else {},
    )
    serving = runtime.Serving()  # before the pool forks: the children share it
    runtime.configure(
        runtime.Runtime(settings, redis_url, worker_id, f"http://127.0.0.1:{spec.port}", serving)
    )
    manager = Manager(
        settings,
        spec,
        client,
        Reporter(client, hb),
        queues,
        serving,
        on_loaded=metrics.model_loaded,
    )
    hb.start()
    try:
        manager.start((alias, model) if alias is not None and model is not None else None)
        manager.wait_preloaded()
        _consume(settings, redis_url, initial, slots, worker_id, banner)
    finally:
        manager.stop()
        hb.stop()
        metrics.stop()
        client.close()


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

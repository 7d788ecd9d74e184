"""`corral worker`: one process = one model's llama-server child + a Celery consumer of that
model's three priority queues, with concurrency = the child's slots."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from pathlib import Path

import redis

from common import keys
from common.registry import WorkerInfo, WorkerState
from common.settings import ModelConfig, Settings
from workers import gpu as gpus
from workers import runtime
from workers.celery_app import configure_app
from workers.heartbeat import Heartbeat
from workers.llama_server import LaunchSpec, LlamaServer, resolve_binary

log = logging.getLogger(__name__)


def new_worker_id(alias: str) -> str:
    return f"{alias}-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"


def run_worker(
    settings: Settings,
    alias: str,
    model: ModelConfig,
    *,
    slots: int | None = None,
    gpu: int | None = None,
    worker_id: str | None = None,
) -> None:
    """Start the llama-server child, advertise it, then consume until told to stop."""
    redis_url = settings.require_redis_url()
    slots = slots or model.parallel
    worker_id = worker_id or new_worker_id(alias)
    model_path = settings.resolve_model_path(model)
    if not model_path.is_file():
        raise FileNotFoundError(f"model file not found for {alias!r}: {model_path}")
    env = {}
    if gpu is not None:
        info = gpus.gpu(gpu)  # fails clearly where NVML is absent
        log.info("worker=%s gpu=%d name=%s total_mb=%d", worker_id, gpu, info.name, info.total_mb)
        env = gpus.child_env(gpu)
    client = redis.Redis.from_url(redis_url)
    _announce_model(client, alias, model, model_path)
    hb = Heartbeat(
        client,
        WorkerInfo(
            id=worker_id, host=socket.gethostname(), pid=os.getpid(), model=alias,
            slots=slots, state=WorkerState.LOADING, gpu="cpu" if gpu is None else str(gpu),
        ),
        settings.heartbeat_interval,
        settings.heartbeat_ttl,
    )  # fmt: skip
    spec = LaunchSpec(
        model_path=model_path, alias=alias, ctx_size=model.ctx_size, parallel=slots,
        embedding=model.embedding, flags=tuple(model.flags), env=env,
        binary=resolve_binary(settings.llama_server), log_name=f"{worker_id} {alias}",
    )  # fmt: skip
    server = LlamaServer(spec)
    hb.start()
    try:
        server.start()
        server.ensure_ready(settings.load_timeout)
        hb.update(state=WorkerState.READY, upstream=server.base_url)
        runtime.configure(runtime.Runtime(settings, redis_url, worker_id, alias, server.base_url))
        _consume(settings, redis_url, alias, slots, worker_id)
    finally:
        hb.stop()
        server.stop()
        client.close()


def _announce_model(client: redis.Redis, alias: str, model: ModelConfig, path: Path) -> None:
    """Put the model in the cluster catalog, so every gateway knows it exists."""
    entry = model.model_copy(update={"model_path": path})
    client.hset(keys.CATALOG, alias, entry.model_dump_json())


def _consume(settings: Settings, redis_url: str, alias: str, slots: int, worker_id: str) -> None:
    app = configure_app(settings, redis_url)
    argv = [
        "worker",
        "--queues", ",".join(keys.model_queues(alias)),
        "--concurrency", str(slots),
        "--pool", "prefork",
        "--hostname", worker_id,
        "--loglevel", settings.log_level,
        "--without-gossip",
        "--without-mingle",
    ]  # fmt: skip
    log.info("worker=%s consuming queues=%s slots=%d", worker_id, argv[2], slots)
    app.worker_main(argv)

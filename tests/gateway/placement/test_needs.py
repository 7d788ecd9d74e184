"""Placement's memory needs for models on other engines: a model that is not a GGUF is
never read as one (so never marked broken for it), and its need comes from `vram_mb`, else
the engine's own memory flag times the worker's budget, else a measurement."""

from __future__ import annotations

import asyncio
from pathlib import Path

import redis.asyncio as aioredis

from common.memory import MemoryRecord, profile
from common.registry import WorkerInfo, WorkerState
from common.settings import ModelConfig
from corral.redis_server import EmbeddedRedis
from gateway.placement.needs import Needs

WORKER = WorkerInfo(id="w", host="h", pid=1, slots=2, state=WorkerState.EMPTY, gpu="0")
WORKER = WORKER.model_copy(update={"budget_mb": 24000})


def vllm(path: Path, *flags: str, **fields: object) -> ModelConfig:
    engine = {"command": ["vllm", "serve", "{model_path}", "--port", "{port}", *flags]}
    return ModelConfig.model_validate({"model_path": str(path), "engine": engine, **fields})


def test_a_model_on_another_engine_is_not_read_as_a_gguf(
    own_redis: EmbeddedRedis, tmp_path: Path
) -> None:
    folder = tmp_path / "qwen"  # a Hugging Face model directory
    folder.mkdir()
    (folder / "config.json").write_text("{}")

    async def main() -> None:
        client = aioredis.Redis.from_url(own_redis.url, decode_responses=True)
        needs = Needs(client)
        try:
            claimed = vllm(folder, "--gpu-memory-utilization", "0.5")
            assert await needs.shape(claimed) is None  # no header, and no ModelBroken
            assert needs.seen(claimed)
            single = tmp_path / "model.safetensors"  # a file, and no GGUF
            single.write_bytes(b"\x00" * 64)
            assert await needs.shape(vllm(single)) is None
            assert await needs.need_mb(claimed, WORKER, {}) == 12000
            assert await needs.need_mb(vllm(folder, vram_mb=9000), WORKER, {}) == 9000
            assert await needs.need_mb(vllm(folder), WORKER, {}) is None  # placement decides
            measured = {profile(claimed, 2, "gpu"): MemoryRecord(measured_mb=11000)}
            assert await needs.need_mb(claimed, WORKER, measured) == 11000
        finally:
            await client.aclose()

    asyncio.run(main())

"""A load's preflight for a model on another engine: no GGUF header is read (a directory
or a non-GGUF file is no broken model), and its need is `vram_mb`, else the engine's own
memory flag times the device's budget."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from common.errors import ModelBroken
from common.settings import ModelConfig, Settings
from corral.redis_server import EmbeddedRedis
from workers.models import preflight


def test_another_engines_model_skips_the_header(tmp_path: Path) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\x00" * 64)
    command = ["vllm", "serve", "{model_path}", "--gpu-memory-utilization", "0.25"]
    other = ModelConfig.model_validate(
        {"model_path": str(weights), "engine": {"command": command}, "ctx_size": 4096}
    )
    plain = ModelConfig(model_path=weights)  # the same file for llama-server: broken
    with EmbeddedRedis() as server:
        client = redis.Redis.from_url(server.url)
        settings = Settings(redis_url=server.url)
        try:
            ready = preflight.prepare(
                settings, client, "m", other, slots=2, device="gpu", budget_mb=16000
            )
            assert ready.need_mb == 4000 and ready.estimate_mb is None
            assert ready.config.ctx_size == 4096 and ready.shape is None
            sized = other.model_copy(update={"vram_mb": 7000})
            assert (
                preflight.prepare(settings, client, "m", sized, slots=2, device="gpu").need_mb
                == 7000
            )
            with pytest.raises(ModelBroken, match="not a loadable GGUF"):
                preflight.prepare(settings, client, "m", plain, slots=2, device="gpu")
        finally:
            client.close()

"""Units: the profile a memory figure is kept under (`common.memory.profile`)."""

from __future__ import annotations

from pathlib import Path

from common.memory import profile
from common.settings import ModelConfig


def _model(path: str, **fields: object) -> ModelConfig:
    return ModelConfig.model_validate({"model_path": Path(path), **fields})


def test_another_file_for_the_alias_is_another_profile() -> None:
    """A 3B file put where a 13B one was measured must not inherit its figure."""
    small, big = _model("/models/qwen-3b.gguf"), _model("/models/qwen-13b.gguf")
    assert profile(small, 2, "gpu") != profile(big, 2, "gpu")


def test_the_same_file_elsewhere_is_the_same_profile() -> None:
    """Gateways and workers may keep one file in different directories."""
    here, there = _model("/models/qwen-3b.gguf"), _model("/srv/llm/qwen-3b.gguf")
    assert profile(here, 2, "gpu") == profile(there, 2, "gpu")


def test_context_slots_flags_and_device_each_matter() -> None:
    base = _model("/m/a.gguf", ctx_size=4096)
    key = profile(base, 2, "gpu")
    assert key != profile(_model("/m/a.gguf", ctx_size=8192), 2, "gpu")
    assert key != profile(base, 4, "gpu")
    assert key != profile(base, 2, "cpu")
    assert key != profile(_model("/m/a.gguf", ctx_size=4096, flags=["-ctk", "q8_0"]), 2, "gpu")

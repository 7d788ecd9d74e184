"""What a model needs in memory, as the cluster knows it: one record per *profile* (device,
context, slots, flags), holding the GGUF estimate and what a worker measured after loading.

Placement prefers the measured figure (estimates of other tools are off by large factors
in both directions); the estimate is only the first guess. Records live in the Redis hash
`keys.memory_key(alias)`, field = `profile(...)`.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import PurePath

from pydantic import BaseModel, Field

from common.settings import ModelConfig


def device_of(gpu: str | None) -> str:
    """ "cpu" or "gpu": measured figures differ (RSS with weights vs VRAM only)."""
    return "cpu" if gpu in (None, "cpu") else "gpu"


def profile(model: ModelConfig, slots: int, device: str) -> str:
    """The key of one memory figure: the same model needs more with a longer context, more
    slots, another cache type, another engine... so each combination is measured on its
    own. The model file's name is part of it: an alias pointed at another file (a bigger
    model, another quantization) starts from its estimate, not from what the old file
    measured (which no `vram_mb` could override). The name, not the path: gateways and
    workers may keep the same file in different directories."""
    flags = hashlib.sha1("\x00".join(model.flags).encode()).hexdigest()[:10]
    name = hashlib.sha1(PurePath(model.model_path).name.encode()).hexdigest()[:8]
    emb = "emb" if model.embedding else "gen"
    key = f"{device}|ctx={model.ctx_size}|slots={slots}|{emb}|flags={flags}|file={name}"
    custom = model.custom_engine
    if custom is not None:  # another engine needs other memory for the same file
        key += "|engine=" + hashlib.sha1("\x00".join(custom.command).encode()).hexdigest()[:10]
    return key


class MemoryRecord(BaseModel):
    estimate_mb: int | None = None
    measured_mb: int | None = None  # RSS (CPU) or NVML per-process (GPU) after the load
    peak_mb: int | None = None  # the highest RSS seen while it served (CPU)
    worker: str | None = None
    at: float = Field(default_factory=time.time)

    def best_mb(self) -> int | None:
        """The figure placement uses: measured (its peak if higher), else the estimate."""
        measured = max(self.measured_mb or 0, self.peak_mb or 0)
        return measured or self.estimate_mb

"""A worker's memory budget: the most its one llama-server child may use.

`--vram-budget` (e.g. `20GiB`) if given; else the pinned GPU's memory from NVML minus a
reserve (the driver, the display, fragmentation); else, on the CPU, `--ram-budget` or half
of the memory psutil reports available. Several workers on one host split its memory by
their budgets: give each an explicit one when more than one runs there.
"""

from __future__ import annotations

import re

import psutil

from workers.hardware import gpu as gpus

RAM_SHARE = 0.5  # of the memory available when the worker starts
GPU_RESERVE_MB = 512  # at least this much VRAM is left for others...
GPU_RESERVE_SHARE = 0.05  # ...or this share of it, whichever is more

_UNITS = {
    "": 1.0,
    "b": 1 / 2**20,
    "k": 1 / 1024,
    "kb": 1e3 / 2**20,
    "kib": 1 / 1024,
    "m": 1.0,
    "mb": 1e6 / 2**20,
    "mib": 1.0,
    "g": 1024.0,
    "gb": 1e9 / 2**20,
    "gib": 1024.0,
    "t": 2**20,
    "tb": 1e12 / 2**20,
    "tib": 2**20,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """A size in MiB: `20GiB`, `20G` (GiB), `1.5GB` (10^9 bytes), `800MiB`, `800` (MiB)."""
    m = _SIZE.match(text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise ValueError(f"not a size: {text!r} (examples: 20GiB, 512MiB, 1.5GB, 800)")
    mb = float(m.group(1)) * _UNITS[unit]
    if mb < 1:
        raise ValueError(f"size too small: {text!r} (at least 1 MiB)")
    return int(mb)


def gpu_budget_mb(total_mb: int) -> tuple[int, int]:
    """(what workers may use, what is kept back) of a GPU with `total_mb` of memory."""
    reserve = max(GPU_RESERVE_MB, int(total_mb * GPU_RESERVE_SHARE))
    return max(total_mb - reserve, 1), reserve


def resolve_budget(
    *, vram_budget: str | None = None, ram_budget: str | None = None, gpu: int | None = None
) -> tuple[int, str]:
    """(budget in MiB, where it came from) for a worker, by the rules above."""
    if vram_budget:
        return parse_size(vram_budget), "--vram-budget"
    if gpu is not None:
        info = gpus.gpu(gpu)  # fails clearly where NVML is absent
        usable, reserve = gpu_budget_mb(info.total_mb)
        return usable, f"GPU {gpu} ({info.name}) minus {reserve} MiB"
    if ram_budget:
        return parse_size(ram_budget), "--ram-budget"
    available = psutil.virtual_memory().available // 2**20
    return max(int(available * RAM_SHARE), 1), f"{RAM_SHARE:.0%} of available RAM"

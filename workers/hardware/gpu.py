"""The GPU behind a worker, through NVML. Everything NVML-specific stays in this module.

On a CPU-only host `corral worker` runs without `--gpu`; asking for a GPU where NVML is
missing is an error that says so, never a silent fall back to the CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from common.devices import gpu_device
from common.errors import GPUUnavailable

log = logging.getLogger(__name__)
_unlisted: set[int] = set()  # GPUs whose processes NVML could not list


@dataclass(frozen=True)
class GPUInfo:
    index: int
    name: str
    total_mb: int
    used_mb: int
    uuid: str = ""  # NVML's GPU-… id: the same whichever index or container sees the GPU

    @property
    def device(self) -> str:
        """Its memory ledger's name (`common.devices`)."""
        return gpu_device(self.uuid or f"index-{self.index}")


def _nvml() -> Any:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, driver errors
        raise GPUUnavailable(
            f"NVML is not available ({exc}): this host has no usable NVIDIA driver. "
            "Run the worker without --gpu to use the CPU."
        ) from exc
    return pynvml


def list_gpus() -> list[GPUInfo]:
    """Every GPU NVML sees; raises GPUUnavailable where NVML is absent."""
    nvml = _nvml()
    try:
        out = []
        for i in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            mem = nvml.nvmlDeviceGetMemoryInfo(handle)
            name = nvml.nvmlDeviceGetName(handle)
            uuid = nvml.nvmlDeviceGetUUID(handle)
            out.append(
                GPUInfo(
                    index=i,
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    total_mb=int(mem.total) // 2**20,
                    used_mb=int(mem.used) // 2**20,
                    uuid=uuid.decode() if isinstance(uuid, bytes) else str(uuid),
                )
            )
        return out
    finally:
        nvml.nvmlShutdown()


def gpu(index: int) -> GPUInfo:
    gpus = list_gpus()
    if not 0 <= index < len(gpus):
        raise GPUUnavailable(f"GPU {index} does not exist: NVML sees {len(gpus)} GPU(s).")
    return gpus[index]


def gpus_or_none() -> list[GPUInfo]:
    """For `corral up`: the GPUs if NVML finds any, else an empty list (CPU)."""
    try:
        return list_gpus()
    except GPUUnavailable:
        return []


def child_env(index: int) -> dict[str, str]:
    """Environment pinning a llama-server child to one GPU (CUDA and Vulkan builds). CUDA
    numbers GPUs fastest first unless told otherwise; NVML, which `index` comes from, by
    PCI bus: on a mixed host the child would run on another GPU than the one budgeted."""
    return {
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "CUDA_VISIBLE_DEVICES": str(index),
        "GGML_VK_VISIBLE_DEVICES": str(index),
    }


def process_used_mb(index: int, pids: Collection[int]) -> int | None:
    """VRAM used by the processes `pids` on GPU `index` (NVML per-process accounting), or
    None if the driver does not list them (yet). Raises GPUUnavailable where NVML is absent."""
    nvml = _nvml()
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        procs = list(nvml.nvmlDeviceGetComputeRunningProcesses(handle))
        procs += list(nvml.nvmlDeviceGetGraphicsRunningProcesses(handle))  # Vulkan builds
    except nvml.NVMLError as exc:  # a driver without the call, a GPU gone: not measured
        if index not in _unlisted:  # said once, not on every measurement
            _unlisted.add(index)
            log.warning(
                "GPU %d: NVML cannot list its processes (%s); the memory a model "
                "uses there is not measured (estimates stand)",
                index,
                exc,
            )
        return None
    finally:
        nvml.nvmlShutdown()
    used = [p.usedGpuMemory for p in procs if p.pid in pids and p.usedGpuMemory]
    return int(sum(used)) // 2**20 if used else None

"""The machine under a worker: CPUs it may use (`cpus`), the GPU through NVML (`gpu`), its
memory budget (`budget`), and what its llama-server really uses (`usage`)."""

from __future__ import annotations

from workers.hardware.budget import resolve_budget

__all__ = ["resolve_budget"]

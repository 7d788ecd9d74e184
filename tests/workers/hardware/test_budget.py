"""A worker's memory budget (`workers.hardware.budget`)."""

from __future__ import annotations

import pytest

from common.errors import GPUUnavailable
from workers.hardware import gpu as gpus
from workers.hardware import usage
from workers.hardware.budget import parse_size, resolve_budget


@pytest.mark.parametrize(
    ("text", "mib"),
    [
        ("20GiB", 20480),
        ("20G", 20480),
        ("512MiB", 512),
        ("512m", 512),
        ("800", 800),
        ("1.5GiB", 1536),
        ("1GB", 953),
        ("2 GiB", 2048),
        ("1TiB", 2**20),
    ],
)
def test_parse_size(text: str, mib: int) -> None:
    assert parse_size(text) == mib


@pytest.mark.parametrize("text", ["", "lots", "12XB", "-1G", "100KiB"])
def test_parse_size_refuses_nonsense(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_budget_sources() -> None:
    assert resolve_budget(vram_budget="20GiB") == (20480, "--vram-budget")
    assert resolve_budget(ram_budget="300MiB") == (300, "--ram-budget")
    mb, source = resolve_budget()
    assert mb > 0 and "available RAM" in source


def test_gpu_budget_without_nvml_fails_clearly() -> None:
    with pytest.raises(GPUUnavailable, match="NVML"):
        resolve_budget(gpu=0)


def test_nvml_that_cannot_list_processes_leaves_memory_unmeasured(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An older driver lacks the call nvidia-ml-py makes (or the GPU is gone): the load is
    not measured, said once; the error used to escape and strand the model manager."""

    class Unsupported(Exception):
        pass

    class FakeNvml:
        NVMLError = Unsupported

        def nvmlDeviceGetHandleByIndex(self, index: int) -> object:
            return object()

        def nvmlDeviceGetComputeRunningProcesses(self, handle: object) -> list[object]:
            raise Unsupported("Function Not Found")

        def nvmlShutdown(self) -> None:
            pass

    monkeypatch.setattr(gpus, "_nvml", FakeNvml)
    monkeypatch.setattr(gpus, "_unlisted", set())
    assert usage.used_mb(1234, gpu=0) is None
    assert usage.used_mb(1234, gpu=0) is None
    said = [r for r in caplog.records if "cannot list its processes" in r.getMessage()]
    assert len(said) == 1

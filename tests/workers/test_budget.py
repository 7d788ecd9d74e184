"""A worker's memory budget (`workers.budget`)."""

from __future__ import annotations

import pytest

from workers.budget import parse_size, resolve_budget
from workers.gpu import GPUUnavailable


@pytest.mark.parametrize(
    ("text", "mib"),
    [("20GiB", 20480), ("20G", 20480), ("512MiB", 512), ("512m", 512), ("800", 800),
     ("1.5GiB", 1536), ("1GB", 953), ("2 GiB", 2048), ("1TiB", 2**20)],
)  # fmt: skip
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

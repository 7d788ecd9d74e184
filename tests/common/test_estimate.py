"""The GGUF memory estimate (`common.estimate`), against llama.cpp's own accounting.

The end-to-end comparison with a real llama-server's RSS is in
tests/test_models_cluster.py (estimate vs measured)."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.estimate import estimate, fit_context, flag_value, read_shape
from corral.tinymodel import make_model


@pytest.fixture(scope="module")
def mid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("est") / "mid.gguf", n_embd=512, n_ff=2048)


def test_shape_read_from_the_header(mid: Path) -> None:
    s = read_shape(mid)
    assert (s.arch, s.n_layer, s.n_embd, s.n_head, s.n_ff, s.n_ctx_train) == (
        "llama",
        2,
        512,
        4,
        2048,
        2048,
    )
    assert s.kv_width_k == s.kv_width_v == 2 * 4 * 128
    assert abs(s.weights_bytes - mid.stat().st_size) < 0.02 * mid.stat().st_size


def test_kv_cache_covers_the_whole_ctx_size_even_past_the_training_context(mid: Path) -> None:
    """llama-server logs `KV buffer size = 16.00 MiB` at ctx 4096 and 64.00 MiB at 16384 for
    this model, although each slot only uses min(ctx/slots, n_ctx_train) = 2048."""
    shape = read_shape(mid)
    assert estimate(shape, ctx_size=4096, slots=2).kv_mb == pytest.approx(16.0)
    assert estimate(shape, ctx_size=16384, slots=2).kv_mb == pytest.approx(64.0)
    # rounded up to 256 cells per slot: ctx 1000 on 3 slots is 3 x 512 cells (llama.cpp: 1536)
    assert estimate(shape, ctx_size=1000, slots=3).kv_mb == pytest.approx(6.0)


def test_cache_type_flags_change_the_kv_size(mid: Path) -> None:
    shape = read_shape(mid)
    f16 = estimate(shape, ctx_size=4096, slots=2).kv_mb
    assert estimate(shape, ctx_size=4096, slots=2, flags=["-ctk", "f32", "-ctv", "f32"]).kv_mb == (
        pytest.approx(2 * f16)
    )
    q8 = estimate(shape, ctx_size=4096, slots=2, flags=["--cache-type-k=q8_0", "-ctv", "q8_0"])
    assert q8.kv_mb == pytest.approx(f16 * 34 / 64)
    # flags win over the config, as on llama-server's command line
    assert estimate(shape, ctx_size=4096, slots=2, flags=["-c", "8192"]).kv_mb == (
        pytest.approx(2 * f16)
    )


def test_compute_buffer_close_to_llama_cpp(mid: Path) -> None:
    """llama.cpp reports `CPU compute buffer size = 18.01 MiB` (ctx 4096, 2 slots) and
    24.01 MiB (ctx 16384) for this model."""
    shape = read_shape(mid)
    assert estimate(shape, ctx_size=4096, slots=2).compute_mb == pytest.approx(18.0, abs=2.0)
    assert estimate(shape, ctx_size=16384, slots=2).compute_mb == pytest.approx(24.0, abs=2.0)
    fa_off = estimate(shape, ctx_size=4096, slots=2, flags=["-fa", "off"]).compute_mb
    assert fa_off > 30  # the KQ matrix


def test_gpu_overhead_and_totals(mid: Path) -> None:
    shape = read_shape(mid)
    cpu = estimate(shape, ctx_size=4096, slots=2)
    gpu = estimate(shape, ctx_size=4096, slots=2, device="gpu")
    assert gpu.total_mb > cpu.total_mb
    assert cpu.total_mb >= cpu.weights_mb + cpu.kv_mb + cpu.compute_mb + cpu.overhead_mb
    assert "weights" in cpu.describe()


def test_flag_value_forms() -> None:
    flags = ["-ctk", "q8_0", "--ctx-size=100", "-c", "200", "--dangling"]
    assert flag_value(flags, "-ctk", "--cache-type-k") == "q8_0"
    assert flag_value(flags, "-c", "--ctx-size") == "200"  # the last one wins
    assert flag_value(flags, "--dangling") is None
    assert flag_value(flags, "-ub") is None


def test_corrupt_file_raises(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(Exception):  # noqa: B017 - whatever gguf raises; callers catch all
        read_shape(bad)


def test_auto_context_is_the_largest_that_fits(tmp_path: Path) -> None:
    shape = read_shape(make_model(tmp_path / "long.gguf", ctx=32768))
    floor = estimate(shape, ctx_size="auto", slots=2).total_mb  # 2 x 2048 at the least
    assert fit_context(shape, 1, slots=2) == 4096  # no room: still the least it may get
    assert fit_context(shape, 10**6, slots=2) == 65536  # all of its training context a slot
    middle = fit_context(shape, floor + 8, slots=2)
    assert 4096 < middle < 65536 and middle % 512 == 0
    assert estimate(shape, ctx_size=middle, slots=2).total_mb <= floor + 8
    assert estimate(shape, ctx_size=middle + 512, slots=2).total_mb > floor + 8

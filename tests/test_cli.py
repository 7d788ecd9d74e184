"""The `corral` command's own behaviour: help that explains, clear errors without tracebacks."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from common.net import free_port
from common.settings import Settings
from corral.redis_server import EmbeddedRedis
from corral.tinymodel import make_model
from corral.up import worker_flags
from tests.conftest import CHAT
from tests.support import env_without_corral, shell_script
from workers.hardware.gpu import GPUInfo

pytestmark = pytest.mark.slow  # every test here runs Corral processes


def _corral(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "corral", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env_without_corral(), **env},
    )


def test_help_lists_every_command() -> None:
    out = _corral("--help")
    assert out.returncode == 0
    for command in (
        "up",
        "gateway",
        "worker",
        "flower",
        "keys",
        "models",
        "status",
        "batches",
        "make-model",
        "drain",
    ):
        assert command in out.stdout


def test_gateway_without_redis_url_says_so_without_a_traceback() -> None:
    out = _corral("gateway", "--port", "0")
    assert out.returncode == 2
    assert "CORRAL_REDIS_URL" in out.stderr and "Traceback" not in out.stderr


def test_worker_whose_llama_server_cannot_run_here_says_why(
    tmp_path: Path, model_dir: Path, redis_server: EmbeddedRedis
) -> None:
    """A llama-server built for another CPU (AVX-512 on a CPU without it) dies of SIGILL as
    it loads the model: the worker exits with the reason and what to do, not a traceback."""
    fake = shell_script(tmp_path / "llama-server", "echo 'loading model'\nkill -ILL $$\n")
    out = _corral(
        "worker",
        "--redis-url",
        redis_server.url,
        "--model",
        str(model_dir / f"{CHAT}.gguf"),
        "--no-banner",
        CORRAL_LLAMA_SERVER=str(fake),
    )
    assert out.returncode == 1, out.stderr[-2000:]
    assert "corral worker:" in out.stderr and "SIGILL" in out.stderr
    assert "CORRAL_LLAMA_SERVER" in out.stderr and "Traceback" not in out.stderr


def test_up_on_a_taken_port_says_so_before_starting_anything(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _corral("up", "--port", str(port), "--data-dir", str(tmp_path))
    assert done.returncode == 1
    assert f"corral up: cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "pick another with --port" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "redis").exists() and not (tmp_path / "models").exists()


def test_up_on_a_public_address_without_keys_refuses_before_the_workers(tmp_path: Path) -> None:
    port = free_port()
    done = _corral("up", "--host", "0.0.0.0", "--port", str(port), "--data-dir", str(tmp_path))
    assert done.returncode == 1
    assert "corral up: refusing to serve 0.0.0.0" in done.stderr
    assert "CORRAL_ADMIN_KEY" in done.stderr and "Traceback" not in done.stderr
    assert "workers.main" not in done.stderr  # no worker was started


def test_up_with_a_file_that_is_not_gguf_says_so(tmp_path: Path) -> None:
    model = tmp_path / "notes.gguf"
    model.write_text("hello")
    done = _corral(
        "up",
        "--model",
        str(model),
        "--port",
        str(free_port()),
        "--data-dir",
        str(tmp_path / "data"),
    )
    assert done.returncode == 1
    assert f"corral up: {model} is not a GGUF file (it starts with b'hell')" in done.stderr
    assert not (tmp_path / "data" / "redis").exists()


def test_worker_without_redis_says_so_in_one_line(tmp_path: Path) -> None:
    model = make_model(tmp_path / "m.gguf")
    done = _corral("worker", "--redis-url", "redis://127.0.0.1:1/0", "--model", str(model))
    assert done.returncode == 2
    assert "corral worker: cannot reach Redis: " in done.stderr
    assert "Traceback" not in done.stderr


def test_up_whose_valkey_cannot_start_says_why(tmp_path: Path) -> None:
    """A damaged append-only file: Valkey's own reason, not a traceback."""
    manifest = tmp_path / "redis" / "appendonlydir" / "appendonly.aof.manifest"
    manifest.parent.mkdir(parents=True)
    manifest.write_text("junk\n")
    done = _corral("up", "--port", str(free_port()), "--data-dir", str(tmp_path))
    assert done.returncode == 2
    assert "corral up: valkey-server exited rc=1" in done.stderr
    assert "AOF manifest" in done.stderr and "Traceback" not in done.stderr


def test_up_refuses_what_it_cannot_serve(tmp_path: Path) -> None:
    zero = _corral("up", "--slots", "0", "--data-dir", str(tmp_path))
    assert zero.returncode == 2 and "--slots: must be 1 or more, not 0" in zero.stderr
    anywhere = _corral("up", "--port", "0", "--data-dir", str(tmp_path))
    assert anywhere.returncode == 1 and "--port 0" in anywhere.stderr


def test_up_puts_floating_workers_on_every_device() -> None:
    """Units (NVML cannot run here): `corral up` starts `max_models_per_device` workers on
    each GPU NVML finds, sharing that GPU's memory (each measures it, unless a budget is
    given); with no GPU, as many on the CPU, all told the same share of the host's RAM."""
    gpus = [
        GPUInfo(index=0, name="A", total_mb=24576, used_mb=0),
        GPUInfo(index=1, name="B", total_mb=16384, used_mb=0),
    ]
    settings = Settings(max_models_per_device=2)
    assert worker_flags(settings, gpus, None) == [["--gpu", "0"]] * 2 + [["--gpu", "1"]] * 2
    assert (
        worker_flags(settings, gpus[:1], "20GiB") == [["--gpu", "0", "--vram-budget", "20GiB"]] * 2
    )
    cpu = worker_flags(Settings(), [], None)
    assert len(cpu) == 3 and len({tuple(f) for f in cpu}) == 1 and cpu[0][0] == "--ram-budget"
    assert worker_flags(Settings(), [], "6GiB") == [["--ram-budget", "6GiB"]] * 3

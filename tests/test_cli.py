"""The `corral` command's own behaviour: help that explains, clear errors without tracebacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from corral.redis_server import EmbeddedRedis
from tests.conftest import CHAT
from tests.support import env_without_corral, shell_script


def _corral(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "corral", *args], capture_output=True,
                          text=True, timeout=60, env={**env_without_corral(), **env})  # fmt: skip


def test_help_lists_every_command() -> None:
    out = _corral("--help")
    assert out.returncode == 0
    for command in ("up", "gateway", "worker", "flower", "keys", "models", "status", "batches",
                    "make-model"):  # fmt: skip
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
    out = _corral("worker", "--redis-url", redis_server.url, "--model",
                  str(model_dir / f"{CHAT}.gguf"), "--no-banner",
                  CORRAL_LLAMA_SERVER=str(fake))  # fmt: skip
    assert out.returncode == 1, out.stderr[-2000:]
    assert "corral worker:" in out.stderr and "SIGILL" in out.stderr
    assert "CORRAL_LLAMA_SERVER" in out.stderr and "Traceback" not in out.stderr

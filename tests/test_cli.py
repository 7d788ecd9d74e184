"""The `corral` command's own behaviour: help that explains, clear errors without tracebacks."""

from __future__ import annotations

import subprocess
import sys

from tests.support import env_without_corral


def _corral(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "corral", *args], capture_output=True,
                          text=True, timeout=60, env=env_without_corral())  # fmt: skip


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

"""Child processes that never outlive their parent: own session (so a terminal's Ctrl-C
reaches only the parent, which then stops children in order), PR_SET_PDEATHSIG so even a
kill -9 of the parent takes them down, and stop = SIGTERM to the group, then SIGKILL."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)


class Child:
    """One supervised child process. Spawn it from a thread that lives as long as it should
    (PDEATHSIG follows the spawning thread); the main thread is the safe choice."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        log: Path | None = None,
        inherit: bool = True,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = {**(os.environ if inherit else {}), **(env or {})}  # else `env` alone
        self.log = log  # stdout+stderr go here; None: inherit ours
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        parent = os.getpid()
        with contextlib.ExitStack() as stack:
            out = stack.enter_context(self.log.open("ab")) if self.log else None
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT if out is not None else None,
                start_new_session=True,
                preexec_fn=lambda: _die_with_parent(parent),
            )
        log.info("started %s pid=%d", self.name, self.proc.pid)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def poll(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def send_signal(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)

    def stop(self, grace: float = 10.0, sig: signal.Signals = signal.SIGTERM) -> int | None:
        """`sig` to the process (it stops its own children in order), then SIGKILL to the
        whole group after `grace`. Idempotent; returns the exit code."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
            deadline = time.monotonic() + grace
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers of its group (pool children)
        rc = proc.wait()
        log.info("stopped %s pid=%d rc=%s", self.name, proc.pid, rc)
        return rc

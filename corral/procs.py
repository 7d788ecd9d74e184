"""A supervised child of a Corral process (`corral up`'s gateway and workers, the tests'
clusters): spawned to die with its parent (`common.spawn`), stopped with a signal to the
process (it stops its own children in order), then SIGKILL to its whole group."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from common.spawn import signal_group, spawn

log = logging.getLogger(__name__)


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
        with contextlib.ExitStack() as stack:
            out = stack.enter_context(self.log.open("ab")) if self.log else None
            self.proc = spawn(
                self.argv, self.env, out, subprocess.STDOUT if out is not None else None
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

    def stop(self, grace: float = 10.0, sig: signal.Signals | None = signal.SIGTERM) -> int | None:
        """`sig` to the process (it stops its own children in order; None: it was sent one
        already, and a second would say it stops twice), then SIGKILL to the whole group
        after `grace`. Idempotent; returns the exit code."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            if sig is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, sig)
            deadline = time.monotonic() + grace
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
        signal_group(proc.pid, signal.SIGKILL)  # stragglers of its group (pool children)
        rc = proc.wait()
        log.info("stopped %s pid=%d rc=%s", self.name, proc.pid, rc)
        return rc

"""Child processes that never outlive their parent, for every process that spawns one
(`corral up` its gateway and workers, a worker its llama-server, tests their clusters).

Each child gets its own session (a terminal's Ctrl-C reaches only the parent, which stops
its children in order; the parent can signal the child's whole group) and
PR_SET_PDEATHSIG, so the kernel SIGKILLs it when its parent dies, even of SIGKILL.
PDEATHSIG fires when the *thread* that forked the child exits, not the process: spawn
from a thread that lives as long as the child should (a main or supervisor thread).

The death signal is set by util-linux's `setpriv --pdeathsig KILL`, which then execs the
command (same pid), where it exists (it does on every Debian and Ubuntu: util-linux is
essential there). Elsewhere a `preexec_fn` sets it, which Python documents as unsafe in a
process with threads (the child may deadlock between fork and exec), as a worker is.

A spawn and a plain `os.fork()` in another thread of the same process must not overlap:
Popen waits for its exec-error pipe to close, and a process forked (not exec'd) meanwhile
holds a copy of its write end for as long as it lives. A worker's Celery pool forks its
children while the model manager may be starting llama-server; Popen then blocked for the
pool child's whole life, and the worker never loaded the model. `_FORKS` makes every fork
of this process wait for a spawn in flight.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import IO

_PR_SET_PDEATHSIG = 1

# Held for a spawn, and by any os.fork() of this process (re-entrant: the preexec_fn path
# forks inside a spawn, in the same thread).
_FORKS = threading.RLock()
os.register_at_fork(
    before=_FORKS.acquire, after_in_parent=_FORKS.release, after_in_child=_FORKS.release
)


def _die_with_parent(prctl: Callable[..., int] | None, parent_pid: int) -> None:
    """preexec_fn, in the child between fork and exec: only async-signal-safe work here.
    `prctl` was looked up in the parent (dlopen() after fork() can deadlock)."""
    if prctl is not None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


SETPRIV = shutil.which("setpriv") if sys.platform.startswith("linux") else None


def spawn(
    argv: Sequence[str],
    env: Mapping[str, str],
    stdout: int | IO[bytes] | None = None,
    stderr: int | IO[bytes] | None = None,
) -> subprocess.Popen[bytes]:
    """Start `argv` in its own session, to die with this process. stdin is /dev/null.
    Raises FileNotFoundError at once if `argv[0]` is not an executable."""
    with _FORKS:
        return _popen(argv, env, stdout, stderr)


def _popen(
    argv: Sequence[str],
    env: Mapping[str, str],
    stdout: int | IO[bytes] | None,
    stderr: int | IO[bytes] | None,
) -> subprocess.Popen[bytes]:
    if SETPRIV is not None:
        program = shutil.which(argv[0])
        if program is None:  # setpriv would only fail after the fork: say it here
            raise FileNotFoundError(errno.ENOENT, "no such executable", argv[0])
        return subprocess.Popen(
            [SETPRIV, "--pdeathsig", "KILL", "--", program, *argv[1:]],
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )
    prctl = ctypes.CDLL(None).prctl if sys.platform.startswith("linux") else None
    return subprocess.Popen(
        list(argv),
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        start_new_session=True,
        preexec_fn=functools.partial(_die_with_parent, prctl, os.getpid()),
    )


def signal_group(pgid: int, sig: signal.Signals) -> None:
    """`sig` to every process of the group a `spawn`ed child leads; gone is fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)

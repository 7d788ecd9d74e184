"""`common.spawn`: a spawn never waits on a process another thread forked meanwhile."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

from common.spawn import spawn

CHILD_LIFE_S = 6.0
FORKS = 60  # 2 ms apart; without the lock one of the first few spawns overlaps one


def test_spawn_does_not_wait_for_a_process_forked_beside_it() -> None:
    """A worker's Celery pool forks while its model manager spawns llama-server. Without the
    fork lock Popen waited for each pool child forked meanwhile to exit (it held a copy of
    Popen's exec-error pipe): the first spawn here blocked for a forked child's whole life."""
    stop = threading.Event()
    forked: list[int] = []

    def fork_repeatedly() -> None:
        while not stop.is_set() and len(forked) < FORKS:
            pid = os.fork()
            if pid == 0:  # a pool child: forked, never exec'd, lives on
                time.sleep(CHILD_LIFE_S)
                os._exit(0)
            forked.append(pid)
            time.sleep(0.002)

    forker = threading.Thread(target=fork_repeatedly, daemon=True)
    forker.start()
    slowest = 0.0
    try:
        spawns = 0
        while forker.is_alive() or spawns < 10:
            spawns += 1
            started = time.monotonic()
            proc = spawn(["true"], dict(os.environ), subprocess.PIPE, subprocess.STDOUT)
            slowest = max(slowest, time.monotonic() - started)
            if slowest > CHILD_LIFE_S / 2:
                break
            assert proc.wait(CHILD_LIFE_S) == 0
            assert proc.stdout is not None
            proc.stdout.close()
    finally:
        stop.set()
        forker.join(5)
        for pid in forked:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    # a blocked spawn lasts as long as the forked child (6 s); a free one a few ms
    assert slowest < CHILD_LIFE_S / 2, f"a spawn waited {slowest:.1f}s on a forked process"
    assert len(forked) == FORKS, "the other thread stopped forking: the race was not run"

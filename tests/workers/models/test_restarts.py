"""Crash backoff and giving up (`workers.models.restarts`)."""

from __future__ import annotations

from workers.models.restarts import CrashHistory


def test_backoff_doubles_then_the_third_crash_in_the_window_gives_up() -> None:
    h = CrashHistory(limit=3, window=300, base=1, cap=30)
    assert h.record(0) == 1
    assert h.record(10) == 2
    assert h.record(20) is None


def test_old_crashes_are_forgotten() -> None:
    h = CrashHistory(limit=3, window=300, base=1, cap=30)
    assert h.record(0) == 1
    assert h.record(100) == 2
    assert h.record(350) == 2  # the crash at 0 left the window
    assert h.recent == 2


def test_backoff_is_capped_and_reset_clears() -> None:
    h = CrashHistory(limit=100, window=1e9, base=1, cap=5)
    delays = [h.record(i) for i in range(6)]
    assert delays == [1, 2, 4, 5, 5, 5]
    h.reset()
    assert h.record(100) == 1

"""The shared `Serving` cell: what the worker's main process sets, forked pool children see."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

import pytest
from celery.exceptions import Reject

from common.settings import Settings
from workers.task.runtime import Runtime, Serving


def _child(serving: Serving, out: multiprocessing.queues.Queue[str | None]) -> None:
    out.put(serving.get())


def test_children_forked_before_a_change_see_it() -> None:
    ctx = multiprocessing.get_context("fork")
    serving = Serving()
    out = ctx.Queue()
    serving.set("model-a")  # the child is forked after this, like a pool child reading later
    proc = ctx.Process(target=_child, args=(serving, out))
    proc.start()
    assert out.get(timeout=5) == "model-a"
    proc.join(5)
    serving.set(None)
    assert serving.get() is None
    with pytest.raises(ValueError):
        serving.set("x" * 600)


def test_a_task_for_another_model_is_sent_back() -> None:
    rt = Runtime(Settings(), "redis://unused", "w1", "http://127.0.0.1:1")
    rt.serving.set("a")
    rt.require_serving("a")
    with pytest.raises(Reject) as info:
        rt.require_serving("b")
    assert info.value.requeue


def _read_forever(serving: Serving) -> None:
    while True:
        serving.get()


def _use(serving: Serving, done: threading.Event) -> None:
    serving.set("model-b")
    serving.get()
    done.set()


def test_a_child_killed_while_reading_stops_no_one() -> None:
    """The OOM killer picks pool children: one killed in the middle of a read must leave
    the cell usable (a lock shared with the children stayed held, and froze every reader
    and the model manager's next set)."""
    ctx = multiprocessing.get_context("fork")
    serving = Serving()
    serving.set("model-a")
    for _ in range(20):
        proc = ctx.Process(target=_read_forever, args=(serving,))
        proc.start()
        time.sleep(0.01)
        os.kill(proc.pid or 0, signal.SIGKILL)
        proc.join(5)
        done = threading.Event()
        threading.Thread(target=_use, args=(serving, done), daemon=True).start()
        assert done.wait(2), "the cell stayed locked by a dead child"
    assert serving.get() == "model-b"


def test_a_child_sees_a_change_made_after_it_was_forked() -> None:
    ctx = multiprocessing.get_context("fork")
    serving = Serving()
    ask, out = ctx.Event(), ctx.Queue()

    def child() -> None:
        ask.wait(5)
        out.put(serving.get())

    proc = ctx.Process(target=child)
    proc.start()
    serving.set("model-c")
    ask.set()
    assert out.get(timeout=5) == "model-c"
    proc.join(5)

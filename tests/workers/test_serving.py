"""The shared `Serving` cell: what the worker's main process sets, forked pool children see."""

from __future__ import annotations

import multiprocessing

import pytest
from celery.exceptions import Reject

from common.settings import Settings
from workers.runtime import Runtime, Serving


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

"""Units: the worker's queue control (`workers.consumer.queues.QueueControl`) turns a broker error
while it changes the consumed queues into a retry, then a `QueueError`, which the model
host handles (unload, mark failed); any other error used to leave the worker LOADING with
nobody consuming its model's queues. Celery's control API is replaced here."""

from __future__ import annotations

from typing import Any

import pytest
from kombu.exceptions import OperationalError

from common.errors import QueueError
from workers.consumer import queues as queues_module
from workers.consumer.queues import QueueControl


class _Control:
    """Celery's remote control: `fail` broker errors first, then it does what it is told."""

    def __init__(self, fail: int) -> None:
        self.fail = fail
        self.active: set[str] = set()

    def add_consumer(self, queue: str, **_: Any) -> None:
        if self.fail > 0:
            self.fail -= 1
            raise OperationalError("connection reset by peer")
        self.active.add(queue)

    def cancel_consumer(self, queue: str, **_: Any) -> None:
        self.active.discard(queue)

    def inspect(self, **_: Any) -> Any:
        control = self

        class _Inspect:
            def active_queues(self) -> dict[str, list[dict[str, str]]]:
                return {"w": [{"name": q} for q in sorted(control.active)]}

        return _Inspect()


def _queues(control: _Control, monkeypatch: pytest.MonkeyPatch) -> QueueControl:
    monkeypatch.setattr(queues_module.time, "sleep", lambda s: None)
    app: Any = type("App", (), {"control": control})()
    queues = QueueControl(app, "w", [])
    queues._on_ready()
    return queues


def test_a_broker_error_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    control = _Control(fail=2)
    _queues(control, monkeypatch).consume(["p1-high.m"])
    assert control.active == {"p1-high.m"}


def test_a_broker_that_keeps_failing_is_a_queue_error(monkeypatch: pytest.MonkeyPatch) -> None:
    control = _Control(fail=100)
    with pytest.raises(QueueError):
        _queues(control, monkeypatch).consume(["p1-high.m"])

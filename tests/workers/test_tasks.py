"""workers.tasks: every task that runs publishes exactly one final frame, even when
something nobody foresaw goes wrong (a unit: the upstream call is replaced)."""

from __future__ import annotations

import time
from typing import Any, NoReturn

import pytest
import redis

from common import keys
from common.frames import Frame, FrameType
from common.jobs import Job, JobKind
from common.priority import Priority
from common.settings import Settings
from common.tracking import RequestState
from corral.redis_server import EmbeddedRedis
from workers import runtime, tasks
from workers.upstream import Upstream


def test_an_unexpected_error_still_ends_the_stream(
    redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*_: Any, **__: Any) -> NoReturn:
        raise RuntimeError("a bug")

    monkeypatch.setattr(Upstream, "stream", boom)
    rt = runtime.Runtime(settings=Settings(), redis_url=redis_server.url, worker_id="w-unit",
                         upstream_url="http://127.0.0.1:9")  # fmt: skip
    monkeypatch.setattr(runtime, "_runtime", rt)
    job = Job(kind=JobKind.CHAT, model="m", body={"messages": []}, stream=True,
              priority=Priority.NORMAL, channel=keys.channel("gw-unit", "r"),
              deadline=time.time() + 60)  # fmt: skip
    client = redis.Redis.from_url(redis_server.url)
    sub = client.pubsub()
    try:
        sub.subscribe(job.channel)
        sub.get_message(timeout=1)  # the subscribe confirmation
        state, error = tasks._run(job)
        frames = []
        while (message := sub.get_message(timeout=2)) is not None:
            frames.append(Frame.model_validate_json(message["data"]))
    finally:
        sub.close()
        client.close()
    assert state is RequestState.FAILED and error
    assert [f.type for f in frames] == [FrameType.START, FrameType.ERROR]
    assert frames[-1].status == 500 and frames[-1].error

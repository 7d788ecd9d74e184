"""The publisher against a real Valkey: order, batching, and noticing a cancel."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import redis

from common.frames import Frame, FrameType
from corral.redis_server import EmbeddedRedis
from workers.publisher import Publisher

CHANNEL = "corral:chan:gw-test:req_1"
CANCEL = "corral:cancel:req_1"


@pytest.fixture
def r(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    client.delete(CANCEL)
    yield client
    client.delete(CANCEL)
    client.close()


def _listen(r: redis.Redis) -> tuple[list[Frame], threading.Thread, redis.client.PubSub]:
    ps = r.pubsub()
    ps.psubscribe("corral:chan:gw-test:*")
    ps.get_message(timeout=1)  # the psubscribe confirmation
    frames: list[Frame] = []

    def run() -> None:
        while not (frames and frames[-1].final):
            msg = ps.get_message(timeout=2)
            if msg is None:
                return
            if msg["type"] == "pmessage":
                frames.append(Frame.model_validate_json(msg["data"]))

    t = threading.Thread(target=run)
    t.start()
    return frames, t, ps


def test_fast_chunks_are_batched_in_order(r: redis.Redis) -> None:
    frames, t, ps = _listen(r)
    pub = Publisher(r, CHANNEL, CANCEL, "w1", interval=0.01)
    pub.start()
    for i in range(500):
        pub.chunk(f'{{"i":{i}}}')
    pub.finish(FrameType.DONE, usage={"completion_tokens": 500})
    t.join(5)
    ps.close()
    assert [f.seq for f in frames] == list(range(len(frames)))
    assert frames[0].type is FrameType.START and frames[0].worker == "w1"
    assert frames[-1].type is FrameType.DONE and frames[-1].usage == {"completion_tokens": 500}
    chunks = [c for f in frames for c in f.chunks]
    assert chunks == [f'{{"i":{i}}}' for i in range(500)]
    assert len(frames) < 100  # batched, not one PUBLISH per chunk


def test_first_chunk_after_quiet_is_not_delayed(r: redis.Redis) -> None:
    frames, t, ps = _listen(r)
    pub = Publisher(r, CHANNEL, CANCEL, "w1", interval=0.5)  # a huge batch window
    pub.start()
    time.sleep(0.05)
    sent = time.monotonic()
    pub.chunk("{}")
    try:
        assert _wait(lambda: any(f.chunks for f in frames), 0.2)
        assert time.monotonic() - sent < 0.2
    finally:
        pub.finish(FrameType.DONE)
        t.join(5)
        ps.close()


def test_cancel_key_is_noticed_while_quiet(r: redis.Redis) -> None:
    _, t, ps = _listen(r)
    fired = threading.Event()
    pub = Publisher(r, CHANNEL, CANCEL, "w1", on_cancel=fired.set)
    pub.start()
    time.sleep(0.05)
    r.set(CANCEL, "1")
    try:
        assert fired.wait(0.2) and pub.cancelled
    finally:
        pub.finish(FrameType.ERROR)
        t.join(5)
        ps.close()


def test_no_listener_means_cancelled(r: redis.Redis) -> None:
    fired = threading.Event()
    pub = Publisher(r, "corral:chan:gone:req_2", CANCEL, "w1", on_cancel=fired.set)
    pub.start()
    assert fired.wait(0.5)
    pub.finish(FrameType.DONE)


def _wait(check: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True

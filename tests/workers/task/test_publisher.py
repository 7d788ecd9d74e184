"""The publisher against a real Valkey: order, batching, noticing a cancel, and flusher
threads that serve one stream after another (and none inherited across a fork)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from common.frames import Frame, FrameType
from corral.redis_server import EmbeddedRedis
from workers.task import publisher
from workers.task.publisher import Publisher

CHANNEL = "corral:chan:gw-test:req_1"
CANCEL = "corral:cancel:req_1"


@pytest.fixture
def r(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    client.delete(CANCEL)
    yield client
    client.delete(CANCEL)
    client.close()


def _listen(
    r: redis.Redis, finals: int = 1
) -> tuple[list[Frame], threading.Thread, redis.client.PubSub]:
    ps = r.pubsub()
    ps.psubscribe("corral:chan:gw-test:*")
    ps.get_message(timeout=1)  # the psubscribe confirmation
    frames: list[Frame] = []

    def run() -> None:
        while sum(f.final for f in frames) < finals:
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


def test_accepted_is_sent_by_the_caller_once_start_went_out(
    r: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ACCEPTED (llama-server's 200) is sent by the task thread itself, as a first chunk
    is: waking the flusher for it cost ~0.3 ms before the gateway could send its
    headers. Before START is out, the flusher sends both, in order."""
    senders: dict[FrameType, str] = {}
    send = Publisher._send

    def recording(self: Publisher, frame: Frame) -> None:
        senders[frame.type] = threading.current_thread().name
        send(self, frame)

    send_start = Publisher._send_start

    def recording_start(self: Publisher) -> None:
        senders[FrameType.START] = threading.current_thread().name
        send_start(self)

    monkeypatch.setattr(Publisher, "_send", recording)
    monkeypatch.setattr(Publisher, "_send_start", recording_start)
    frames, t, ps = _listen(r)
    pub = Publisher(r, CHANNEL, CANCEL, "w1")
    pub.start()
    assert _wait(lambda: len(frames) == 1, 2)  # START
    pub.accepted()
    pub.finish(FrameType.DONE)
    t.join(5)
    ps.close()
    assert [f.type for f in frames] == [FrameType.START, FrameType.ACCEPTED, FrameType.DONE]
    assert senders[FrameType.ACCEPTED] == threading.current_thread().name
    assert senders[FrameType.START] != threading.current_thread().name


def test_chunks_after_quiet_spells_and_in_bursts_stay_in_order(r: redis.Redis) -> None:
    """Quiet spells make the task thread send a chunk itself, bursts go through the
    flusher: the two writers must never reorder frames nor lose a chunk."""
    frames, t, ps = _listen(r)
    pub = Publisher(r, CHANNEL, CANCEL, "w1", interval=0.002)
    pub.start()
    pub.accepted()
    sent = []
    for i in range(300):
        if i % 7 == 0:
            time.sleep(0.003)  # longer than the interval: the next chunk goes out inline
        sent.append(f'{{"i":{i}}}')
        pub.chunk(sent[-1])
    pub.finish(FrameType.DONE)
    t.join(5)
    ps.close()
    assert [f.seq for f in frames] == list(range(len(frames)))
    assert [f.type for f in frames[:2]] == [FrameType.START, FrameType.ACCEPTED]
    assert [c for f in frames for c in f.chunks] == sent
    assert frames[-1].type is FrameType.DONE


def test_chunks_given_together_share_a_frame(r: redis.Redis) -> None:
    frames, t, ps = _listen(r)
    pub = Publisher(r, CHANNEL, CANCEL, "w1", interval=0.5)
    pub.start()
    time.sleep(0.05)
    pub.chunk("{}")  # goes out at once, alone
    assert _wait(lambda: any(f.chunks for f in frames), 2)
    pub.chunk('{"role":1}', '{"token":1}')  # one batch: the window holds both, not one
    pub.finish(FrameType.DONE)
    t.join(5)
    ps.close()
    assert [f.chunks for f in frames if f.chunks] == [["{}"], ['{"role":1}', '{"token":1}']]


def test_finish_without_start_still_announces_and_ends(r: redis.Redis) -> None:
    """A call that failed before its request went out never started the publisher."""
    frames, t, ps = _listen(r)
    Publisher(r, CHANNEL, CANCEL, "w1").finish(FrameType.ERROR, status=502)
    t.join(5)
    ps.close()
    assert [f.type for f in frames] == [FrameType.START, FrameType.ERROR]
    assert frames[-1].status == 502


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


def test_no_listener_means_cancelled(r: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nobody hears START: its gateway is gone, once it stayed so a while (a gateway whose
    broker came back subscribes again within seconds; its request must not be dropped)."""
    monkeypatch.setattr(publisher, "LISTENER_WAIT_S", 0.3)
    fired = threading.Event()
    pub = Publisher(r, "corral:chan:gone:req_2", CANCEL, "w1", on_cancel=fired.set)
    pub.start()
    assert not fired.wait(0.15)  # START is sent again meanwhile
    assert fired.wait(1)
    pub.finish(FrameType.DONE)


def test_a_start_heard_late_is_not_given_up(r: redis.Redis) -> None:
    """The gateway subscribes while START is being sent again: the stream goes on."""
    fired = threading.Event()
    pub = Publisher(r, CHANNEL, CANCEL, "w1", on_cancel=fired.set)
    pub.start()
    time.sleep(0.25)  # two sends nobody heard
    frames, t, ps = _listen(r)
    pub.finish(FrameType.DONE)
    t.join(5)
    ps.close()
    assert not fired.is_set()
    assert [(f.seq, f.type) for f in frames] == [(0, FrameType.START), (1, FrameType.DONE)]


def test_flusher_threads_serve_one_stream_after_another(r: redis.Redis) -> None:
    def flushers() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name == "corral-publisher"}

    for _ in range(2):  # warm: at least one idle flusher afterwards
        _publish_one(r, "w1")
    before = flushers()
    for _ in range(5):
        frames = _publish_one(r, "w1")
        assert [f.type for f in frames] == [FrameType.START, FrameType.CHUNKS, FrameType.DONE]
    assert flushers() == before  # no thread started per stream


def test_concurrent_streams_each_get_their_own_flusher(r: redis.Redis) -> None:
    frames, t, ps = _listen(r, finals=2)
    first = Publisher(r, CHANNEL, CANCEL, "w1", interval=0.01)
    second = Publisher(r, CHANNEL.replace("req_1", "req_3"), CANCEL, "w2", interval=0.01)
    first.start()
    second.start()
    second.finish(FrameType.DONE)  # not stuck behind `first`, which is still open
    first.finish(FrameType.DONE)
    t.join(5)
    ps.close()
    assert sorted(f.worker or "" for f in frames if f.type is FrameType.START) == ["w1", "w2"]


def test_a_forked_child_starts_its_own_flusher(r: redis.Redis, redis_server: EmbeddedRedis) -> None:
    _publish_one(r, "w1")  # leaves an idle flusher the child must not count on
    assert publisher._idle
    pid = os.fork()
    if pid == 0:  # the child: exit codes only, never back into pytest
        ok = False
        try:
            client = redis.Redis.from_url(redis_server.url)
            ok = not publisher._idle and len(_publish_one(client, "child")) == 3
        finally:
            os._exit(0 if ok else 1)
    deadline = time.monotonic() + 5
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child's stream never finished")
    assert os.waitstatus_to_exitcode(done[1]) == 0


def _publish_one(r: redis.Redis, worker: str) -> list[Frame]:
    frames, t, ps = _listen(r)
    pub = Publisher(r, CHANNEL, CANCEL, worker, interval=0.001)
    pub.start()
    pub.chunk("{}")
    pub.finish(FrameType.DONE)
    t.join(5)
    ps.close()
    return frames


def _wait(check: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_a_stream_holds_one_connection_and_gives_it_back(r: redis.Redis) -> None:
    frames, t, ps = _listen(r)
    pub = Publisher(r, CHANNEL, CANCEL, "w1", interval=0.005)
    pub.start()
    held = set()
    for i in range(20):
        pub.chunk(f'{{"i":{i}}}')
        time.sleep(0.01)  # quiet enough that each chunk is a frame of its own
        if pub._conn is not None:  # None until the flusher sent its first frame
            held.add(id(pub._conn))
    pub.finish(FrameType.DONE)
    t.join(5)
    ps.close()
    assert len(frames) > 10 and [f.seq for f in frames] == list(range(len(frames)))
    assert len(held) == 1  # one connection for every frame
    assert pub._conn is None  # back in the pool once the final frame went out
    assert held <= {id(c) for c in r.connection_pool._available_connections}


def test_a_frame_whose_connection_was_killed_goes_out_on_another(r: redis.Redis) -> None:
    """The stream's own connection dropped by the server (a restart, a proxy): the next
    frame is sent through a pipeline on a fresh connection; no frame is lost."""
    frames, t, ps = _listen(r)
    pub = Publisher(r, CHANNEL, CANCEL, "w1", interval=0.005)
    pub.start()
    pub.chunk('{"i":0}')
    assert _wait(lambda: any(f.chunks for f in frames), 2)
    assert pub._conn is not None and pub._conn._sock is not None
    port = pub._conn._sock.getsockname()[1]
    killed = [c for c in r.client_list() if c["addr"].endswith(f":{port}")]
    assert len(killed) == 1
    r.client_kill_filter(_id=killed[0]["id"])
    time.sleep(0.02)
    pub.chunk('{"i":1}')
    pub.finish(FrameType.DONE)
    t.join(5)
    ps.close()
    assert not pub.cancelled
    assert [f.seq for f in frames] == list(range(len(frames)))
    assert [c for f in frames for c in f.chunks] == ['{"i":0}', '{"i":1}']
    assert frames[-1].type is FrameType.DONE

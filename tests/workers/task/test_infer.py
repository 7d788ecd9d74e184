"""workers.task.infer: every task that runs publishes exactly one final frame, even when
something nobody foresaw goes wrong; a task that is not ours to run (cancelled while queued)
publishes nothing, though its claim is read only once its llama-server call is sent
(units: the upstream call is replaced)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import pytest
import redis

from common import redis_keys, telemetry
from common.frames import Frame, FrameType
from common.jobs import Job, JobKind
from common.priority import Priority
from common.settings import Settings
from common.telemetry import Summary
from common.tracking import RequestState
from corral.redis_server import EmbeddedRedis
from workers.task import infer, ledger, runtime
from workers.task.ledger import Claim
from workers.task.upstream import Abort, StreamEnd, Upstream


@pytest.fixture
def rt(redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch) -> Iterator[runtime.Runtime]:
    rt = runtime.Runtime(
        settings=Settings(),
        redis_url=redis_server.url,
        worker_id="w-unit",
        upstream_url="http://127.0.0.1:9",
    )
    monkeypatch.setattr(runtime, "_runtime", rt)
    yield rt
    rt.redis.close()


@pytest.fixture
def job() -> Job:
    return Job(
        kind=JobKind.CHAT,
        model="m",
        body={"messages": []},
        stream=True,
        priority=Priority.NORMAL,
        channel=redis_keys.channel("gw-unit", "r"),
        deadline=time.time() + 60,
    )


@pytest.fixture
def frames(rt: runtime.Runtime, job: Job) -> Iterator[Callable[[], list[Frame]]]:
    """What the task publishes on the job's channel, read when called."""
    sub = rt.redis.pubsub()
    sub.subscribe(job.channel)
    sub.get_message(timeout=1)  # the subscribe confirmation

    def read() -> list[Frame]:
        out = []
        while (message := sub.get_message(timeout=0.3)) is not None:
            out.append(Frame.model_validate_json(message["data"]))
        return out

    yield read
    sub.close()


def _claim(rt: runtime.Runtime, job: Job) -> ledger.PendingClaim:
    return ledger.PendingClaim(rt.redis, job, rt.worker_id, 60)


def _one_token(
    _self: Upstream,
    _path: str,
    _body: dict[str, Any],
    on_chunk: Callable[..., None],
    _abort: Abort,
    on_sent: Callable[[], None],
    on_accepted: Callable[[], None],
) -> StreamEnd:
    on_sent()
    on_accepted()
    on_chunk('{"choices": [{"delta": {"content": "x"}}]}')
    return StreamEnd(usage={"completion_tokens": 1})


def test_an_unexpected_error_still_ends_the_stream(
    rt: runtime.Runtime,
    job: Job,
    frames: Callable[[], list[Frame]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def boom(*_: Any, **__: Any) -> NoReturn:
        raise RuntimeError("a bug")

    monkeypatch.setattr(Upstream, "stream", boom)
    state, error = infer._run(job, _claim(rt, job))
    got = frames()
    assert state is RequestState.FAILED and error
    assert [f.type for f in got] == [FrameType.START, FrameType.ERROR]
    assert got[-1].status == 500 and got[-1].error


def test_a_task_claimed_first_streams(
    rt: runtime.Runtime,
    job: Job,
    frames: Callable[[], list[Frame]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(Upstream, "stream", _one_token)
    state, _ = infer._run(job, _claim(rt, job))
    assert state is RequestState.DONE
    types = [f.type for f in frames()]
    assert types == [FrameType.START, FrameType.ACCEPTED, FrameType.CHUNKS, FrameType.DONE]
    assert rt.redis.get(redis_keys.claim_key(job.request_id)) == b"w-unit"


def test_a_task_cancelled_while_queued_publishes_nothing(
    rt: runtime.Runtime,
    job: Job,
    frames: Callable[[], list[Frame]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sent: list[bool] = []

    def stream(*args: Any) -> StreamEnd:
        sent.append(True)
        return _one_token(*args)

    monkeypatch.setattr(Upstream, "stream", stream)
    rt.redis.set(redis_keys.cancel_key(job.request_id), "1")
    with pytest.raises(infer.NotOurs) as caught:
        infer._run(job, _claim(rt, job))
    assert caught.value.claim is Claim.CANCELLED
    assert sent == [True]  # the call was cut when the claim was read, right after sending
    assert frames() == []
    assert rt.redis.get(redis_keys.claim_key(job.request_id)) is None


def test_a_call_that_failed_before_sending_reads_the_claim_too(
    rt: runtime.Runtime, job: Job, frames: Callable[[], list[Frame]]
) -> None:
    """Nothing listens on port 9: the call fails before `on_sent`; the claim still decides
    whether the failure is published (here: cancelled, so it is not)."""
    rt.redis.set(redis_keys.cancel_key(job.request_id), "1")
    with pytest.raises(infer.NotOurs):
        infer._run(job, _claim(rt, job))
    assert frames() == []


def test_a_lost_llama_server_releases_the_claim_it_took(
    rt: runtime.Runtime, job: Job, frames: Callable[[], list[Frame]]
) -> None:
    """A non-streaming call that failed before it was sent (llama-server gone: nothing
    listens on port 9) takes the claim, then releases it, so the gateway's resubmission
    runs (it used to find the claim naming this live worker and be dropped as a
    duplicate, its client left waiting until the deadline)."""
    job = job.model_copy(update={"stream": False})
    state, _ = infer._run(job, _claim(rt, job))
    assert state is RequestState.FAILED
    last = frames()[-1]
    assert last.type is FrameType.ERROR and last.error is not None
    assert last.error.code == "worker_lost"
    assert rt.redis.get(redis_keys.claim_key(job.request_id)) is None
    resubmission = ledger.PendingClaim(rt.redis, job, "w-other", 60).result()
    assert resubmission is Claim.FIRST


def test_a_duplicate_whose_llama_server_is_gone_leaves_the_owners_claim(
    rt: runtime.Runtime, job: Job, frames: Callable[[], list[Frame]]
) -> None:
    job = job.model_copy(update={"stream": False})
    rt.redis.set(redis_keys.claim_key(job.request_id), "w-owner")
    rt.redis.set(redis_keys.worker_key("w-owner"), "{}")  # alive, and still running it
    with pytest.raises(infer.NotOurs) as caught:
        infer._run(job, _claim(rt, job))
    assert caught.value.claim is Claim.DUPLICATE
    assert rt.redis.get(redis_keys.claim_key(job.request_id)) == b"w-owner"
    assert frames() == []


def test_a_batch_item_that_lost_llama_server_is_given_back(rt: runtime.Runtime) -> None:
    """Nothing listens on port 9: the item leaves no result and nothing in the running set,
    so the batch supervisor sends it again (it used to stay "running" and hold the batch
    until it expired)."""
    job = Job(
        kind=JobKind.CHAT,
        model="m-batch",
        body={"messages": []},
        stream=False,
        priority=Priority.LOW,
        channel="",
        deadline=time.time() + 60,
        batch_id="batch_unit",
        custom_id="c1",
        request_id="batch_unit-0",
    )
    infer._run_batch_item(job)
    assert rt.redis.zrange(redis_keys.running_key("m-batch"), 0, -1) == []
    assert not rt.redis.hexists(redis_keys.batch_results_key("batch_unit"), "c1")
    record = rt.redis.hgetall(redis_keys.request_key(job.request_id))
    assert record[b"state"] == RequestState.QUEUED.value.encode()
    assert rt.redis.ttl(redis_keys.request_key(job.request_id)) > 0


def test_a_claim_that_cannot_be_read_still_ends_the_request(
    rt: runtime.Runtime,
    job: Job,
    frames: Callable[[], list[Frame]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Redis fails while the claim's reply is read: whose task it is stays unknown, so
    nothing was streamed; one out-of-band error frame ends the request (the task used to
    end with no frame at all, and its client waited for its deadline)."""

    def unreadable(self: ledger.PendingClaim) -> Claim:
        raise redis.ConnectionError("Connection reset by peer")

    monkeypatch.setattr(Upstream, "stream", _one_token)
    monkeypatch.setattr(ledger.PendingClaim, "result", unreadable)
    state, _ = infer._run(job, _claim(rt, job))
    assert state is RequestState.FAILED
    got = frames()
    assert [(f.seq, f.type) for f in got] == [(-1, FrameType.ERROR)]
    assert got[0].status == 503 and got[0].error is not None
    assert got[0].error.code == "redis_unavailable"


def test_a_finished_request_leaves_its_measures_in_its_record_and_telemetry(
    rt: runtime.Runtime,
    job: Job,
    frames: Callable[[], list[Frame]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The record shows TTFT and tokens; the model's telemetry buckets count the request
    with llama-server's timings (both written with the final frame)."""
    timings = {"prompt_n": 7, "prompt_ms": 2.0, "predicted_n": 1, "predicted_ms": 0.5}

    def stream(*args: Any) -> StreamEnd:
        _one_token(*args)
        usage = {"prompt_tokens": 7, "completion_tokens": 1}
        return StreamEnd(usage=usage, timings=timings)

    monkeypatch.setattr(Upstream, "stream", stream)
    job = job.model_copy(update={"model": f"m-tel-{time.time_ns()}"})
    state, _ = infer._run(job, _claim(rt, job))
    assert state is RequestState.DONE and frames()[-1].type is FrameType.DONE
    record = rt.redis.hgetall(redis_keys.request_key(job.request_id))
    assert record[b"prompt_tokens"] == b"7" and record[b"completion_tokens"] == b"1"
    assert 0 <= float(record[b"ttft_ms"]) < 5000
    keys = telemetry.window_keys(job.model, 60, 2, time.time())  # a minute may have turned
    counted = Summary.of([rt.redis.hgetall(k) for k in keys]).report()
    assert (counted["requests"], counted["done"], counted["completion_tokens"]) == (1, 1, 1)
    assert counted["prompt_tokens_per_s"] == 3500.0 and counted["ttft_ms"] is not None

from __future__ import annotations

import pytest
from pydantic import ValidationError

from common.errors import ModelNotFound, QueueFull, UpstreamError, WorkerLost, from_body
from common.frames import Frame, FrameType
from common.jobs import Job, JobKind
from common.wire import ChatCompletionRequest, CompletionRequest, EmbeddingRequest


def test_unknown_fields_pass_through() -> None:
    req = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "top_k": 5,
            "ignore_eos": True,
        }
    )
    dumped = req.model_dump(exclude_unset=True)
    assert dumped["top_k"] == 5 and dumped["ignore_eos"] is True
    assert "temperature" not in dumped  # unset fields are not invented


@pytest.mark.parametrize(
    "body",
    [
        {"messages": [{"role": "user", "content": "x"}]},
        {"model": "m", "messages": []},
        {"model": "", "messages": [{"role": "user", "content": "x"}]},
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 9},
        {"model": "m", "messages": [{"role": "wizard", "content": "x"}]},  # issue 24
    ],
)
def test_bad_chat_bodies_are_refused(body: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate(body)


def test_one_choice_per_request_and_the_schema_says_so() -> None:
    hi = [{"role": "user", "content": "x"}]
    assert ChatCompletionRequest.model_validate({"model": "m", "messages": hi, "n": 1}).n == 1
    with pytest.raises(ValidationError, match="one choice per request"):
        ChatCompletionRequest.model_validate({"model": "m", "messages": hi, "n": 2})
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "n": 0})
    schema = ChatCompletionRequest.model_json_schema()["properties"]["n"]
    assert schema["maximum"] == 1


def test_prompt_and_input_shapes() -> None:
    for prompt in ("a", ["a", "b"], [1, 2], [[1], [2]]):
        CompletionRequest(model="m", prompt=prompt)
        EmbeddingRequest(model="m", input=prompt)
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"model": "m", "prompt": {"x": 1}})


def test_job_round_trips_as_json() -> None:
    job = Job(kind=JobKind.CHAT, model="m", body={"a": 1}, channel="c", deadline=1.0)
    again = Job.model_validate_json(job.model_dump_json())
    assert again == job and again.request_id.startswith("req_")
    assert again.expired(now=2.0) and not again.expired(now=0.5)
    assert JobKind.EMBEDDING.path == "/v1/embeddings"


def test_frames_know_which_are_final() -> None:
    assert Frame(seq=0, type=FrameType.DONE).final
    assert not Frame(seq=0, type=FrameType.CHUNKS, chunks=["{}"]).final


def test_error_envelope_shape_and_retry_after() -> None:
    err = QueueFull("full", retry_after=4.4)
    assert err.envelope() == {
        "error": {
            "message": "full",
            "type": "rate_limit_error",
            "param": None,
            "code": "queue_full",
        }
    }
    # rounded up: a client that waits the whole seconds it is told is never too early
    assert err.status == 429 and err.headers() == {"Retry-After": "5"}
    missing = ModelNotFound("x")
    assert missing.status == 404 and missing.code == "model_not_found"


def test_errors_survive_a_process_boundary() -> None:
    rebuilt = from_body(UpstreamError("boom", status=503).body(), 503)
    assert rebuilt.status == 503 and rebuilt.message == "boom"
    assert from_body(ModelNotFound("x").body(), 404).status == 404
    assert isinstance(from_body(WorkerLost("gone").body(), 502), WorkerLost)

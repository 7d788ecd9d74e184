"""The OpenAI surface end to end: the official client against a real gateway, real Celery
workers on a real Valkey, and real llama-server children."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import CHAT, EMBED, Cluster
from tests.support import busy_slots, wait_for, workers

HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello there"}]


def test_chat_completion(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=CHAT, messages=HI, max_tokens=16)
    assert reply.object == "chat.completion"
    assert reply.model == CHAT
    assert reply.choices[0].message.role == "assistant"
    assert isinstance(reply.choices[0].message.content, str)
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 16


def test_chat_completion_stream(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=CHAT,
        messages=HI,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text) > 0
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 24
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length"


def test_stream_without_include_usage_has_no_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(model=CHAT, messages=HI, max_tokens=8, stream=True)
    )
    assert chunks and all(c.usage is None for c in chunks)


def test_completions(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=CHAT, prompt="Once upon a time", max_tokens=8)
    assert reply.object == "text_completion"
    assert isinstance(reply.choices[0].text, str)
    streamed = list(client.completions.create(model=CHAT, prompt="Once", max_tokens=8, stream=True))
    assert streamed and streamed[0].choices[0].text is not None


def test_embeddings(client: openai.OpenAI) -> None:
    reply = client.embeddings.create(model=EMBED, input=["hello world", "bye"])
    assert [d.index for d in reply.data] == [0, 1]
    assert len(reply.data[0].embedding) == 64  # the generated model's n_embd
    assert reply.data[0].embedding != reply.data[1].embedding


def test_model_list_and_get(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert {CHAT, EMBED} <= ids
    assert client.models.retrieve(CHAT).id == CHAT
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_unknown_model_is_404_model_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="no-such-model", messages=HI)
    assert err.value.code == "model_not_found"


def test_malformed_bodies_are_400_in_openai_envelope(cluster: Cluster) -> None:
    url = f"{cluster.base_url}/v1/chat/completions"
    cases = [
        b"{not json",
        json.dumps({"model": CHAT}).encode(),  # no messages
        json.dumps({"model": CHAT, "messages": []}).encode(),
        json.dumps({"model": CHAT, "messages": HI, "max_tokens": "many"}).encode(),
        b"\xff\xfe",
    ]
    for body in cases:
        r = httpx.post(url, content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["type"] == "invalid_request_error" and err["message"]
        assert r.headers["x-request-id"].startswith("req_")


def test_malformed_body_via_client_is_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=CHAT, messages=[])


def test_wrong_model_kind_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=CHAT, input="x")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=EMBED, messages=HI)


@pytest.mark.parametrize(
    ("header", "tier", "expected"),
    [
        ("high", None, "high"),
        ("normal", None, "normal"),
        ("low", None, "low"),
        ("HIGH", "flex", "high"),  # the header wins
        (None, "priority", "high"),
        (None, "default", "normal"),
        (None, "auto", "normal"),
        (None, "flex", "low"),
        (None, None, "normal"),
    ],
)
def test_priorities_accepted(
    client: openai.OpenAI, header: str | None, tier: str | None, expected: str
) -> None:
    headers = {"X-Request-Priority": header} if header else {}
    extra = {"service_tier": tier} if tier else {}
    raw = client.chat.completions.with_raw_response.create(
        model=CHAT, messages=HI, max_tokens=2, extra_headers=headers, extra_body=extra
    )
    assert raw.headers["x-request-priority"] == expected
    assert raw.parse().choices


def test_invalid_priority_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=CHAT, messages=HI, extra_headers={"X-Request-Priority": "urgent"}
        )
    assert err.value.code == "invalid_priority"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=CHAT, messages=HI, extra_body={"service_tier": "x"})


def test_upstream_error_before_first_token_is_a_status(cluster: Cluster) -> None:
    """A prompt longer than the slot's context fails at llama-server before streaming:
    the client gets a 4xx reply in the envelope, not a 200 stream with an error in it."""
    long_prompt = "hello " * 12000  # more tokens than the 8192 per slot
    r = httpx.post(
        f"{cluster.base_url}/v1/completions",
        json={"model": CHAT, "prompt": long_prompt, "max_tokens": 4, "stream": True},
        timeout=30,
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"]


def test_disconnect_mid_stream_frees_the_slot(cluster: Cluster) -> None:
    """Client leaves mid-stream → the worker closes its llama-server stream → slot idle."""
    (worker,) = workers(cluster.redis_url, CHAT)
    upstream = worker.upstream
    assert upstream is not None
    body = {
        "model": CHAT,
        "messages": HI,
        "max_tokens": 6000,  # ~seconds of generation if nobody stopped it
        "stream": True,
        "ignore_eos": True,
    }
    with (
        httpx.Client(timeout=30) as http,
        http.stream("POST", f"{cluster.base_url}/v1/chat/completions", json=body) as resp,
    ):
        assert resp.status_code == 200
        request_id = resp.headers["x-request-id"]
        lines = resp.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
        assert busy_slots(upstream) >= 1
    left = time.monotonic()
    assert wait_for(lambda: busy_slots(upstream) == 0, timeout=1.0), cluster.logs()
    print(f"slot freed {1000 * (time.monotonic() - left):.0f} ms after the client left")
    # Cut, not finished: on a fast CPU the generation could end by itself within the second.
    record = httpx.get(f"{cluster.base_url}/v1/requests/{request_id}").json()
    assert record["state"] == "cancelled", record

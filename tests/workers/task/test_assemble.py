"""A non-streaming reply assembled from llama-server's stream (`workers.task.assemble`)
against the reply llama-server itself sends, on a real llama-server: greedy sampling makes
both runs generate the same tokens. And the pieces a stream carries that a plain chat does
not (tool calls in parts, reasoning, logprobs), on plain data."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from common.assembly import Assembler
from common.jobs import JobKind
from corral.tinymodel import make_model
from workers.engine.server import EngineServer, LaunchSpec
from workers.task.upstream import Abort, Upstream

GREEDY = {"temperature": 0, "top_k": 1, "seed": 1, "max_tokens": 24, "cache_prompt": False}


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    model = make_model(tmp_path_factory.mktemp("assemble") / "m.gguf")
    spec = LaunchSpec(model_path=model, alias="m", ctx_size=2048, parallel=1)
    with EngineServer(spec) as srv:
        srv.ensure_ready(30)
        yield Upstream(srv.base_url, 30)


def _both(
    up: Upstream, kind: JobKind, body: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    whole = up.request(kind.path, {**body, "stream": False}, Abort())
    parts = Assembler(kind)
    end = up.stream(
        kind.path,
        {**body, "stream": True, "stream_options": {"include_usage": True}},
        parts.add,
        Abort(),
    )
    return whole, parts.reply(end.usage, end.timings)


@pytest.mark.slow
def test_a_chat_reply_assembled_from_the_stream_is_llama_servers_own(upstream: Upstream) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **GREEDY}
    whole, assembled = _both(upstream, JobKind.CHAT, body)
    assert assembled["object"] == whole["object"] == "chat.completion"
    assert assembled["choices"][0]["message"] == whole["choices"][0]["message"]
    assert assembled["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert assembled["usage"] == whole["usage"]
    assert assembled["model"] == whole["model"] and assembled["id"].startswith("chatcmpl-")
    assert set(whole["timings"]) <= set(assembled["timings"])


@pytest.mark.slow
def test_a_completion_reply_assembled_from_the_stream_is_llama_servers_own(
    upstream: Upstream,
) -> None:
    whole, assembled = _both(upstream, JobKind.COMPLETION, {"model": "m", "prompt": "a", **GREEDY})
    assert assembled["object"] == whole["object"] == "text_completion"
    assert assembled["choices"][0]["text"] == whole["choices"][0]["text"]
    assert assembled["usage"] == whole["usage"]


def test_tool_calls_reasoning_and_logprobs_are_joined() -> None:
    parts = Assembler(JobKind.CHAT)
    parts.add(
        '{"id":"c1","created":1,"model":"m","choices":[{"index":0,"delta":{"role":"assistant",'
        '"reasoning_content":"think "}}]}',
        '{"choices":[{"index":0,"delta":{"reasoning_content":"hard"},'
        '"logprobs":{"content":[{"token":"a","logprob":-0.1}]}}]}',
        '{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1",'
        '"type":"function","function":{"name":"get","arguments":"{\\"ci"}}]}}]}',
        '{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,'
        '"function":{"arguments":"ty\\": 1}"}}]},"logprobs":{"content":[{"token":"b"}]}}]}',
        '{"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}',
    )
    reply = parts.reply({"total_tokens": 5}, None)
    (choice,) = reply["choices"]
    assert choice["message"]["reasoning_content"] == "think hard"
    assert choice["message"]["content"] is None
    assert choice["message"]["tool_calls"] == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get", "arguments": '{"city": 1}'},
        }
    ]
    assert [p["token"] for p in choice["logprobs"]["content"]] == ["a", "b"]
    assert choice["finish_reason"] == "tool_calls" and reply["usage"] == {"total_tokens": 5}
    assert reply["id"] == "c1" and "timings" not in reply

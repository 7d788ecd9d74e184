"""A reply assembled from a relayed stream, and a kept reply replayed as SSE: the round
trip gives back what the stream said, for chat (content, tool calls, logprobs, several
choices) and completions."""

from __future__ import annotations

import json
from typing import Any

from common.jobs import JobKind
from gateway.cache.replies import StreamAssembler, replay_events

HEAD = {"id": "chatcmpl-1", "created": 5, "model": "m", "object": "chat.completion.chunk"}


def chunk(*choices: dict[str, Any], **extra: Any) -> str:
    return json.dumps({**HEAD, "choices": list(choices), **extra})


def events(body: bytes) -> list[Any]:
    lines = [line for line in body.decode().split("\n\n") if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def chat_stream() -> list[str]:
    return [
        chunk({"index": 0, "delta": {"role": "assistant", "content": "Hel"}}),
        chunk({"index": 1, "delta": {"role": "assistant", "content": "Yo"}}),
        chunk(
            {
                "index": 0,
                "delta": {"content": "lo", "reasoning_content": "think"},
                "logprobs": {"content": [{"token": "lo", "logprob": -0.1}]},
            }
        ),
        chunk(
            {
                "index": 1,
                "delta": {
                    "tool_calls": [
                        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f"}}
                    ]
                },
            }
        ),
        chunk(
            {"index": 1, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"a"'}}]}}
        ),
        chunk(
            {"index": 1, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}}
        ),
        chunk({"index": 0, "delta": {}, "finish_reason": "stop"}),
        chunk({"index": 1, "delta": {}, "finish_reason": "tool_calls"}),
    ]


def test_chat_stream_assembles_into_the_whole_reply() -> None:
    asm = StreamAssembler(JobKind.CHAT, 10_000)
    stream = chat_stream()
    asm.add(stream[:3])
    asm.add(stream[3:])
    usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    reply = asm.result(usage)
    assert reply is not None
    assert reply["object"] == "chat.completion" and reply["id"] == "chatcmpl-1"
    first, second = reply["choices"]
    assert first["message"] == {
        "role": "assistant",
        "content": "Hello",
        "reasoning_content": "think",
    }
    assert first["finish_reason"] == "stop"
    assert first["logprobs"] == {"content": [{"token": "lo", "logprob": -0.1}]}
    assert second["message"]["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    ]
    assert reply["usage"] == usage


def test_replay_gives_back_what_the_stream_said() -> None:
    asm = StreamAssembler(JobKind.CHAT, 10_000)
    asm.add(chat_stream())
    reply = asm.result({"total_tokens": 7})
    assert reply is not None
    replayed = events(replay_events(JobKind.CHAT, reply, include_usage=True))
    again = StreamAssembler(JobKind.CHAT, 10_000)
    again.add([json.dumps(e) for e in replayed])
    assert again.result(None) == reply
    assert all(e["object"] == "chat.completion.chunk" for e in replayed)
    assert replayed[-1]["choices"] == [] and replayed[-1]["usage"] == {"total_tokens": 7}
    no_usage = events(replay_events(JobKind.CHAT, reply, include_usage=False))
    assert all(e["choices"] for e in no_usage)


def test_completion_stream_round_trip() -> None:
    head = {"id": "cmpl-1", "created": 1, "model": "m", "object": "text_completion"}
    stream = [
        json.dumps({**head, "choices": [{"index": 0, "text": "Once", "finish_reason": None}]}),
        json.dumps({**head, "choices": [{"index": 0, "text": " upon", "finish_reason": "length"}]}),
        json.dumps({**head, "choices": [], "usage": {"completion_tokens": 2}}),
    ]
    asm = StreamAssembler(JobKind.COMPLETION, 10_000)
    asm.add(stream)
    reply = asm.result(None)
    assert reply is not None
    assert reply["choices"] == [
        {"index": 0, "text": "Once upon", "finish_reason": "length", "logprobs": None}
    ]
    assert reply["usage"] == {"completion_tokens": 2} and reply["object"] == "text_completion"
    replayed = events(replay_events(JobKind.COMPLETION, reply, include_usage=False))
    assert "".join(c["text"] for e in replayed for c in e["choices"]) == "Once upon"


def test_unfinished_or_oversized_streams_are_not_kept() -> None:
    cut = StreamAssembler(JobKind.CHAT, 10_000)
    cut.add(chat_stream()[:-1])  # choice 1 never finished
    assert cut.result(None) is None
    big = StreamAssembler(JobKind.CHAT, 200)
    big.add(chat_stream())
    assert big.overflow and big.result(None) is None
    assert StreamAssembler(JobKind.CHAT, 100).result(None) is None  # nothing streamed

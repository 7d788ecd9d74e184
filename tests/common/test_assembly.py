"""A whole reply assembled from an OpenAI stream's chunks (`common.assembly`), and the
response cache's replay of it as SSE (`gateway.cache.replies`): the round trip gives back
what the stream said, for chat (content, reasoning, tool calls, logprobs, several choices)
and completions."""

from __future__ import annotations

import json
from typing import Any

from common.assembly import Assembler
from common.jobs import JobKind
from gateway.cache.replies import replay_events

HEAD = {"id": "chatcmpl-1", "created": 5, "model": "m", "object": "chat.completion.chunk"}
LOGPROB = {"token": "lo", "logprob": -0.1}


def chunk(*choices: dict[str, Any], **extra: Any) -> str:
    return json.dumps({**HEAD, "choices": list(choices), **extra})


def tool_part(**function: str) -> dict[str, Any]:
    return {"index": 1, "delta": {"tool_calls": [{"index": 0, "function": function}]}}


def events(body: bytes) -> list[Any]:
    lines = [line for line in body.decode().split("\n\n") if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def chat_stream() -> list[str]:
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f"}}
    return [
        chunk({"index": 0, "delta": {"role": "assistant", "content": "Hel"}}),
        chunk({"index": 1, "delta": {"role": "assistant", "content": None}}),
        chunk(
            {
                "index": 0,
                "delta": {"content": "lo", "reasoning_content": "think"},
                "logprobs": {"content": [LOGPROB]},
            }
        ),
        chunk({"index": 1, "delta": {"tool_calls": [call]}}),
        chunk(tool_part(arguments='{"a"')),
        chunk(tool_part(arguments=": 1}")),
        chunk({"index": 0, "delta": {}, "finish_reason": "stop"}),
        chunk({"index": 1, "delta": {}, "finish_reason": "tool_calls"}),
    ]


def test_chat_stream_assembles_into_the_whole_reply() -> None:
    asm = Assembler(JobKind.CHAT)
    stream = chat_stream()
    asm.add(*stream[:3])
    assert not asm.finished
    asm.add(*stream[3:])
    assert asm.finished
    usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    reply = asm.reply(usage)
    assert reply["object"] == "chat.completion" and reply["id"] == "chatcmpl-1"
    first, second = reply["choices"]
    assert first["message"] == {
        "role": "assistant",
        "content": "Hello",
        "reasoning_content": "think",
    }
    assert first["finish_reason"] == "stop" and first["logprobs"] == {"content": [LOGPROB]}
    assert second["message"]["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    ]
    assert second["message"]["content"] is None and reply["usage"] == usage


def test_replay_gives_back_what_the_stream_said() -> None:
    asm = Assembler(JobKind.CHAT)
    asm.add(*chat_stream())
    reply = asm.reply({"total_tokens": 7})
    replayed = events(replay_events(JobKind.CHAT, reply, include_usage=True))
    again = Assembler(JobKind.CHAT)
    again.add(*[json.dumps(e) for e in replayed])
    assert again.reply({"total_tokens": 7}) == reply
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
    asm = Assembler(JobKind.COMPLETION)
    asm.add(*stream)
    reply = asm.reply({"completion_tokens": 2})
    assert reply["choices"] == [
        {"index": 0, "text": "Once upon", "logprobs": None, "finish_reason": "length"}
    ]
    assert reply["object"] == "text_completion"
    replayed = events(replay_events(JobKind.COMPLETION, reply, include_usage=False))
    assert "".join(c["text"] for e in replayed for c in e["choices"]) == "Once upon"


def test_a_stream_cut_short_is_not_finished() -> None:
    cut = Assembler(JobKind.CHAT)
    cut.add(*chat_stream()[:-1])  # choice 1 never finished
    assert not cut.finished
    assert not Assembler(JobKind.CHAT).finished  # nothing streamed

"""A non-streaming reply, assembled from llama-server's stream.

The worker always asks llama-server for a stream, even when the client asked for one
whole reply: a stream's socket is read chunk by chunk, so closing it (a cancel, the client
gone, the time limit) stops the generation at once, while llama-server goes on generating a
non-streaming request to its end whatever happens to its socket. This module turns the
chunks back into the reply llama-server would have sent: the content, reasoning, tool calls
(their arguments joined), logprobs, finish reason, usage and timings, with the stream's own
id, created time, model and fingerprint.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from common.jobs import JobKind
from workers.task.upstream import Abort, Upstream, noop


@dataclass
class _Choice:
    index: int
    role: str = "assistant"
    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    tools: dict[int, dict[str, Any]] = field(default_factory=dict)  # index -> the call so far
    logprobs: list[Any] = field(default_factory=list)
    finish_reason: str | None = None


class Assembler:
    """Feed it each chunk's JSON text (`add`), then take the reply (`reply`)."""

    def __init__(self, kind: JobKind) -> None:
        self.kind = kind
        self._head: dict[str, Any] = {}
        self._choices: dict[int, _Choice] = {}

    def add(self, *raw: str) -> None:
        for text in raw:
            chunk = json.loads(text)
            for key in ("id", "created", "model", "system_fingerprint"):
                if key in chunk and key not in self._head:
                    self._head[key] = chunk[key]
            for part in chunk.get("choices") or []:
                self._add_choice(part)

    def _add_choice(self, part: dict[str, Any]) -> None:
        index = int(part.get("index") or 0)
        choice = self._choices.setdefault(index, _Choice(index))
        if part.get("finish_reason"):
            choice.finish_reason = part["finish_reason"]
        logprobs = part.get("logprobs")
        if isinstance(logprobs, dict):
            choice.logprobs += logprobs.get("content") or []
        if self.kind is JobKind.COMPLETION:
            choice.content.append(part.get("text") or "")
            return
        delta = part.get("delta") or {}
        choice.role = delta.get("role") or choice.role
        if delta.get("content"):
            choice.content.append(delta["content"])
        if delta.get("reasoning_content"):
            choice.reasoning.append(delta["reasoning_content"])
        for call in delta.get("tool_calls") or []:
            _add_tool_call(choice, call)

    def reply(self, usage: dict[str, Any] | None, timings: dict[str, Any] | None) -> dict[str, Any]:
        chat = self.kind is not JobKind.COMPLETION
        body: dict[str, Any] = {
            "id": self._head.get("id"),
            "object": "chat.completion" if chat else "text_completion",
            "created": self._head.get("created"),
            "model": self._head.get("model"),
            "choices": [self._choice(c, chat) for _, c in sorted(self._choices.items())],
        }
        if "system_fingerprint" in self._head:
            body["system_fingerprint"] = self._head["system_fingerprint"]
        if usage is not None:
            body["usage"] = usage
        if timings is not None:
            body["timings"] = timings
        return body

    @staticmethod
    def _choice(c: _Choice, chat: bool) -> dict[str, Any]:
        logprobs = {"content": c.logprobs} if c.logprobs else None
        if not chat:
            text = "".join(c.content)
            return {
                "index": c.index,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": c.finish_reason,
            }
        message: dict[str, Any] = {"role": c.role, "content": "".join(c.content) or None}
        if c.reasoning:
            message["reasoning_content"] = "".join(c.reasoning)
        if c.tools:
            message["tool_calls"] = [c.tools[i] for i in sorted(c.tools)]
        if message["content"] is None and not c.tools:
            message["content"] = ""
        return {
            "index": c.index,
            "message": message,
            "logprobs": logprobs,
            "finish_reason": c.finish_reason,
        }


def _add_tool_call(choice: _Choice, call: dict[str, Any]) -> None:
    """A tool call arrives in pieces: its id, type and name once, its arguments in parts."""
    index = int(call.get("index") or 0)
    known = choice.tools.setdefault(
        index, {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
    )
    if call.get("id"):
        known["id"] = call["id"]
    if call.get("type"):
        known["type"] = call["type"]
    function = call.get("function") or {}
    if function.get("name"):
        known["function"]["name"] += function["name"]
    if function.get("arguments"):
        known["function"]["arguments"] += function["arguments"]


def whole_reply(
    upstream: Upstream,
    kind: JobKind,
    body: dict[str, Any],
    abort: Abort,
    on_sent: Callable[[], None] = noop,
) -> dict[str, Any]:
    """A non-streaming reply, streamed from llama-server and assembled (embeddings, which
    do not stream, are asked for whole)."""
    body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    if kind is JobKind.EMBEDDING:
        return upstream.request(kind.path, body, abort, on_sent)
    parts = Assembler(kind)
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    end = upstream.stream(kind.path, body, parts.add, abort, on_sent)
    return parts.reply(end.usage, end.timings)

"""A whole reply from an OpenAI stream's chunks: what the non-streaming request would have
got — content, reasoning, tool calls (their arguments joined), logprobs, finish reasons,
usage and timings, with the stream's own id, created time, model and fingerprint.

Both sides need it: the gateway's response cache keeps a streamed reply whole (so it can
answer a non-streaming request too), and a worker that streams from its engine can answer
a non-streaming request with it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from common.jobs import JobKind

HEAD_FIELDS = ("id", "created", "model", "system_fingerprint")  # a reply's, not a choice's


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
            for key in HEAD_FIELDS:
                if key in chunk and key not in self._head:
                    self._head[key] = chunk[key]
            for part in chunk.get("choices") or []:
                self._add_choice(part)

    @property
    def finished(self) -> bool:
        """Whether every choice streamed its finish reason (a stream cut short has not)."""
        return bool(self._choices) and all(c.finish_reason for c in self._choices.values())

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

    def reply(
        self, usage: dict[str, Any] | None, timings: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        chat = self.kind is not JobKind.COMPLETION
        body: dict[str, Any] = {
            "id": self._head.get("id"),
            "object": "chat.completion" if chat else "text_completion",
            "created": self._head.get("created"),
            "model": self._head.get("model"),
            "choices": [_choice(c, chat) for _, c in sorted(self._choices.items())],
        }
        if "system_fingerprint" in self._head:
            body["system_fingerprint"] = self._head["system_fingerprint"]
        if usage is not None:
            body["usage"] = usage
        if timings is not None:
            body["timings"] = timings
        return body


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

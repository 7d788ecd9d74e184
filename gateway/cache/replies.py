"""A kept reply in both directions: assembled from the chunks a stream relayed (one
whole `chat.completion` or `text_completion`, as a non-streaming request gets it), and
replayed as that JSON or as server-sent events, whichever way the next request asks.

What is kept is the whole reply, so a stream can answer a non-streaming request and the
reverse. A replayed stream carries each choice's whole message in one chunk, then its
finish reason, then the usage chunk if `stream_options.include_usage` asked for it.
"""

from __future__ import annotations

import json
from typing import Any

from common.jobs import JobKind
from gateway.streaming.sse import DONE

HEAD_FIELDS = ("id", "created", "model", "system_fingerprint")  # a reply's, not a choice's


class StreamAssembler:
    """Collects a relayed stream's chunks (raw JSON text) into its whole reply; gives up,
    keeping nothing, past `limit` bytes."""

    def __init__(self, kind: JobKind, limit: int) -> None:
        self.kind = kind
        self._limit = limit
        self._size = 0
        self._head: dict[str, Any] = {}
        self._choices: dict[int, dict[str, Any]] = {}
        self.usage: dict[str, Any] | None = None
        self.overflow = False

    def add(self, chunks: list[str]) -> None:
        if self.overflow:
            return
        for raw in chunks:
            self._size += len(raw)
            if self._size > self._limit:
                self.overflow = True
                self._choices.clear()
                return
            self._add(json.loads(raw))

    def _add(self, chunk: dict[str, Any]) -> None:
        for field in HEAD_FIELDS:
            if field in chunk and field not in self._head:
                self._head[field] = chunk[field]
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            into = self._choices.setdefault(int(choice.get("index", 0)), {})
            if self.kind is JobKind.CHAT:
                _merge_delta(into.setdefault("message", {}), choice.get("delta") or {})
            else:
                into["text"] = into.get("text", "") + (choice.get("text") or "")
            _merge_logprobs(into, choice.get("logprobs"))
            if choice.get("finish_reason") is not None:
                into["finish_reason"] = choice["finish_reason"]

    def result(self, usage: dict[str, Any] | None) -> dict[str, Any] | None:
        """The whole reply, or None if it cannot be kept (too large, or a choice that did
        not finish)."""
        if self.overflow or not self._choices:
            return None
        if any("finish_reason" not in c for c in self._choices.values()):
            return None
        kind = "chat.completion" if self.kind is JobKind.CHAT else "text_completion"
        choices = []
        for index, choice in sorted(self._choices.items()):
            item: dict[str, Any] = {"index": index, **choice}
            if self.kind is JobKind.CHAT:
                item["message"].setdefault("role", "assistant")
                item["message"].setdefault("content", None)
            item.setdefault("logprobs", None)
            choices.append(item)
        reply = {**self._head, "object": kind, "choices": choices}
        if usage or self.usage:
            reply["usage"] = usage or self.usage
        return reply


def _merge_delta(message: dict[str, Any], delta: dict[str, Any]) -> None:
    for key, value in delta.items():
        if value is None:
            continue
        if key == "tool_calls":
            _merge_tool_calls(message.setdefault("tool_calls", []), value)
        elif key == "role":
            message["role"] = value
        elif isinstance(value, str):
            message[key] = (message.get(key) or "") + value
        else:
            message[key] = value


def _merge_tool_calls(calls: list[dict[str, Any]], deltas: list[dict[str, Any]]) -> None:
    """OpenAI streams a tool call in pieces, by `index`: its id, type and name once, its
    arguments a fragment at a time."""
    for delta in deltas:
        index = int(delta.get("index", len(calls)))
        while len(calls) <= index:
            calls.append({"function": {"name": "", "arguments": ""}})
        call = calls[index]
        for key in ("id", "type"):
            if delta.get(key):
                call[key] = delta[key]
        function = delta.get("function") or {}
        call["function"]["name"] += function.get("name") or ""
        call["function"]["arguments"] += function.get("arguments") or ""


def _merge_logprobs(into: dict[str, Any], logprobs: Any) -> None:
    if not isinstance(logprobs, dict):
        return
    kept = into.setdefault("logprobs", {})
    for key, value in logprobs.items():
        if isinstance(value, list):
            kept[key] = kept.get(key, []) + value
        else:
            kept[key] = value


def replay_events(kind: JobKind, reply: dict[str, Any], include_usage: bool) -> bytes:
    """A kept reply as the server-sent events of a stream, `data: [DONE]` included."""
    head: dict[str, Any] = {k: reply[k] for k in HEAD_FIELDS if k in reply}
    head["object"] = "chat.completion.chunk" if kind is JobKind.CHAT else "text_completion"
    events: list[dict[str, Any]] = []
    for choice in reply.get("choices", []):
        index, logprobs = choice.get("index", 0), choice.get("logprobs")
        if kind is JobKind.CHAT:
            delta = {k: v for k, v in (choice.get("message") or {}).items() if v is not None}
            if "tool_calls" in delta:
                delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(delta["tool_calls"])]
            first = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": None}
            last = {"index": index, "delta": {}, "finish_reason": choice.get("finish_reason")}
        else:
            text = choice.get("text") or ""
            first = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": None}
            last = {"index": index, "text": "", "finish_reason": choice.get("finish_reason")}
        events += [{**head, "choices": [first]}, {**head, "choices": [last]}]
    if include_usage and reply.get("usage"):
        events.append({**head, "choices": [], "usage": reply["usage"]})
    body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    return body + DONE

"""A kept reply replayed as server-sent events, for a streaming request.

What is kept is the whole reply (a stream's assembled by `common.assembly`), so a stream
can answer a non-streaming request and the reverse. A replayed stream carries each
choice's whole message in one chunk, then its finish reason, then the usage chunk if
`stream_options.include_usage` asked for it, then `data: [DONE]`.
"""

from __future__ import annotations

import json
from typing import Any

from common.assembly import HEAD_FIELDS
from common.jobs import JobKind
from gateway.streaming.sse import DONE


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

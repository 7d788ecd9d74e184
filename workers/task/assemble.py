"""A non-streaming reply, assembled from llama-server's stream.

The worker always asks llama-server for a stream, even when the client asked for one
whole reply: a stream's socket is read chunk by chunk, so closing it (a cancel, the client
gone, the time limit) stops the generation at once, while llama-server goes on generating a
non-streaming request to its end whatever happens to its socket. This module turns the
chunks back into the reply llama-server would have sent: the content, reasoning, tool calls
(their arguments joined), logprobs, finish reason, usage and timings, with the stream's own
id, created time, model and fingerprint (`common.assembly`, which the response cache uses
too).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from common.assembly import Assembler
from common.jobs import JobKind
from workers.task.upstream import Abort, Upstream, noop


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

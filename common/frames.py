"""Pub/sub frames: what a worker publishes on a request's channel (step 5 of the path).

One PUBLISH carries one frame; a frame carries a batch of raw OpenAI chunk JSON texts
(flushed every `flush_interval_ms`), so a fast model costs a bounded number of publishes a
second, not one per token.
`seq` counts frames from 0 per request: a gap means a lost frame, and the gateway then
ends the stream with an error instead of silently dropping tokens.

A stream's frames: START (the worker took the task), ACCEPTED (llama-server answered 200,
so the prompt is valid and generation is under way: the gateway sends its own 200 and
SSE headers now, while the first token is computed, rather than with it), CHUNKS …, then
one final frame. An error llama-server reports before its 200 (a prompt too long) still
becomes a proper 4xx reply.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field

from common.errors import CorralError, ErrorBody


class FrameType(StrEnum):
    START = "start"  # a worker took the task: `worker` says which (heartbeat to watch)
    ACCEPTED = "accepted"  # llama-server took the stream (its 200): the reply can begin
    CHUNKS = "chunks"  # streamed OpenAI chunks, in order
    RESULT = "result"  # a whole non-streaming response body (final)
    DONE = "done"  # end of a stream, with `usage` when llama-server reported it (final)
    ERROR = "error"  # `error` + `status` (final)


FINAL_TYPES = frozenset({FrameType.RESULT, FrameType.DONE, FrameType.ERROR})


class Frame(BaseModel):
    seq: int
    type: FrameType
    worker: str | None = None
    chunks: list[str] = Field(default_factory=list)
    body: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None
    error: ErrorBody | None = None
    status: int | None = None

    @property
    def final(self) -> bool:
        return self.type in FINAL_TYPES


OUT_OF_BAND = -1  # the seq of a final frame sent from outside the request's run


def out_of_band_error(err: CorralError) -> str:
    """A final error frame for a request, sent by someone other than the run publishing its
    frames (a cancel from another gateway, a redelivery's verdict, a queued request's
    expiry): its seq is `OUT_OF_BAND`, which the gateway accepts whatever it saw before."""
    frame = Frame(seq=OUT_OF_BAND, type=FrameType.ERROR, error=err.body(), status=err.status)
    return frame.model_dump_json(exclude_defaults=True)

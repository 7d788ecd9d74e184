"""Steps 5 → 6 of the request path: one pub/sub connection per gateway (`pubsub`), the hub
that routes each frame to the request waiting for it (`hub`), the frames out to the client
as server-sent events (`sse`), and, after a reconnect, the requeue of queued requests the
broker lost (`recovery`)."""

from __future__ import annotations

from gateway.streaming.hub import StreamHub
from gateway.streaming.sse import SSEResponse

__all__ = ["SSEResponse", "StreamHub"]

"""The response cache: replies to requests whose output their input decides, kept in Redis
per model and per tenant and replayed without a worker, a queue or a load.

`policy` says which requests may be cached and what their key is; `replies` replays a
kept reply as SSE; `store` reads and fills Redis (a relayed stream assembled whole by
`common.assembly`) and counts hits and misses. The request path calls it twice: a lookup
before the request is queued (`gateway.relay`), and a fill once the whole reply has been
relayed."""

from __future__ import annotations

from gateway.cache.store import Lookup, ResponseCache

__all__ = ["Lookup", "ResponseCache"]

"""Every Redis key, queue and channel name Corral uses, in one place (arq's `constants.py`).

Queue names sort in priority order (`p1-high.<alias>` < `p2-normal.<alias>` <
`p3-low.<alias>`): with kombu's `queue_order_strategy='sorted'` a worker's BRPOP then
always drains high before normal before low (DESIGN.md, "Celery on Redis").
"""

from __future__ import annotations

from common.priority import Priority

PREFIX = "corral"

# The one Celery task every request becomes.
INFER_TASK = "corral.infer"

_RANK = {Priority.HIGH: 1, Priority.NORMAL: 2, Priority.LOW: 3}


def queue_name(alias: str, priority: Priority) -> str:
    """The Celery queue (and Redis list) holding `alias` requests at `priority`."""
    return f"p{_RANK[priority]}-{priority.value}.{alias}"


def model_queues(alias: str) -> list[str]:
    """A model's queues, highest priority first (the order a worker must consume them)."""
    return [queue_name(alias, p) for p in sorted(_RANK, key=_RANK.__getitem__)]


def channel(gateway_id: str, request_id: str) -> str:
    """Pub/sub channel carrying one request's frames back to the gateway that owns it."""
    return f"{PREFIX}:chan:{gateway_id}:{request_id}"


def channel_pattern(gateway_id: str) -> str:
    """The one pattern a gateway process subscribes to: all of its requests' channels."""
    return f"{PREFIX}:chan:{gateway_id}:*"


def request_id_of(channel_name: str) -> str:
    """Inverse of `channel`: the request id is the last `:`-separated part."""
    return channel_name.rsplit(":", 1)[-1]


def cancel_key(request_id: str) -> str:
    """Set (with a TTL) when a request is cancelled; workers check it before and while running."""
    return f"{PREFIX}:cancel:{request_id}"


def claim_key(task_id: str) -> str:
    """`SET NX` by the worker that runs a task, so a redelivered copy never runs twice."""
    return f"{PREFIX}:claim:{task_id}"


def worker_key(worker_id: str) -> str:
    """A worker's registry entry; its TTL is the worker's heartbeat."""
    return f"{PREFIX}:worker:{worker_id}"


def request_key(request_id: str) -> str:
    """Hash tracking one request: state, model, priority, times, worker (`common.tracking`)."""
    return f"{PREFIX}:req:{request_id}"


def running_key(model: str) -> str:
    """Sorted set of `<worker id>|<request id>` running for a model, scored by start time."""
    return f"{PREFIX}:running:{model}"


# Set of worker ids that registered; entries whose key expired are pruned by readers.
WORKERS = f"{PREFIX}:workers"

# Hash alias -> ModelConfig JSON: every model some gateway config or worker announced.
CATALOG = f"{PREFIX}:catalog"

# Hash sha256(secret) -> ApiKey JSON: the user API keys. Secrets themselves are never stored.
API_KEYS = f"{PREFIX}:apikeys"


def ratelimit_key(key_id: str, dimension: str) -> str:
    """A key's token bucket for `dimension` ("requests" or "tokens")."""
    return f"{PREFIX}:ratelimit:{key_id}:{dimension}"

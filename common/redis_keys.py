"""Every Redis key, queue and channel name Corral uses, in one place (arq's `constants.py`).

Queue names sort in priority order (`p1-high.<alias>` < `p2-normal.<alias>` <
`p3-low.<alias>`): with kombu's `queue_order_strategy='sorted'` a worker's BRPOP then
always drains high before normal before low. A replica's own affinity queue of a priority
(`p1-high+<alias>@<worker>`) sorts just before that priority's shared queue and after
every queue of a higher priority: the replica takes the requests sent to it first, and
strict priority holds.
"""

from __future__ import annotations

from common.priority import Priority

PREFIX = "corral"

# The one Celery task every request becomes.
INFER_TASK = "corral.infer"

_RANK = {Priority.HIGH: 1, Priority.NORMAL: 2, Priority.LOW: 3}


def text(value: bytes | str) -> str:
    """A Redis reply as text: clients built with and without `decode_responses` differ."""
    return value.decode() if isinstance(value, bytes) else value


def queue_name(alias: str, priority: Priority) -> str:
    """The Celery queue (and Redis list) holding `alias` requests at `priority`."""
    return f"p{_RANK[priority]}-{priority.value}.{alias}"


def model_queues(alias: str) -> list[str]:
    """A model's interactive queues, highest priority first (the order they drain in)."""
    return [queue_name(alias, p) for p in sorted(_RANK, key=_RANK.__getitem__)]


def client_request_key(owner: str | None, client_id: str) -> str:
    """String: our request id for a client's own `X-Request-ID`, per API key (`-`: the admin
    and an open gateway), so a client finds (and cancels) its request by its own id."""
    return f"{PREFIX}:client-request:{owner or '-'}:{client_id}"


def affinity_queue(alias: str, priority: Priority, worker_id: str) -> str:
    """The Celery queue (and Redis list) of `alias` requests at `priority` sent to one
    replica for its prompt cache (`gateway.queueing.affinity`). Its messages are routed
    to the shared queue (`queue_name`): one restored or sent back lands there."""
    return f"p{_RANK[priority]}-{priority.value}+{alias}@{worker_id}"


def affinity_queues(alias: str, worker_id: str) -> list[str]:
    """A replica's affinity queues of `alias`, highest priority first."""
    return [affinity_queue(alias, p, worker_id) for p in sorted(_RANK, key=_RANK.__getitem__)]


def consumed_queues(alias: str, worker_id: str) -> list[str]:
    """Every queue a worker serving `alias` consumes: the shared ones, its own affinity
    queues, and the batch queue."""
    return [*affinity_queues(alias, worker_id), *worker_queues(alias)]


def affinity_key(alias: str, key: str) -> str:
    """String (with a TTL): the worker that last ran a request of `alias` with this
    affinity key (`common.affinity`), written by that worker as it claims the task."""
    return f"{PREFIX}:affinity:{alias}:{key}"


def kombu_bindings(queue: str) -> list[str]:
    """The keys kombu's Redis transport keeps for a queue a consumer declared (its exchange
    is named after it): its binding table and that table's permanent copy."""
    return [f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}"]


# Hash affinity queue -> JSON {alias, priority, worker}: every replica's affinity queues,
# so the sweeper finds those of replicas that left (`gateway.queueing.affinity_sweep`).
AFFINITY_QUEUES = f"{PREFIX}:affinity-queues"


def live_key(queue: str) -> str:
    """Sorted set request id -> deadline: the requests of an interactive queue that may still
    run (not started, not cancelled). The queue's list keeps dead entries (cancelled,
    expired) until a worker pops and drops them; depth, the cap and stats count this set."""
    return f"{PREFIX}:live:{queue}"


def live_keys(alias: str) -> list[str]:
    """The live sets of a model's interactive queues, highest priority first."""
    return [live_key(q) for q in model_queues(alias)]


def worker_queues(alias: str) -> list[str]:
    """Every queue a worker holding `alias` consumes: interactive ones, then batch items."""
    return [*model_queues(alias), batch_queue(alias)]


def batch_queue(alias: str) -> str:
    """Batch items: below every interactive priority, so they only soak up idle slots."""
    return f"p4-batch.{alias}"


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


def telemetry_key(model: str, span: int, index: int) -> str:
    """Hash of one model's request counters for the `span`-second bucket number `index`
    (epoch seconds // span), written by workers as requests end (`common.telemetry`)."""
    return f"{PREFIX}:tel:{model}:{span}:{index}"


# List of the latest request ids, newest first (capped at `RECENT_MAX` by the enqueue
# script): the status page's "recent requests".
RECENT_REQUESTS = f"{PREFIX}:recent"
RECENT_MAX = 200


# Set of worker ids that registered; entries whose key expired are pruned by readers.
WORKERS = f"{PREFIX}:workers"

# Hash alias -> ModelConfig JSON: every model some gateway config or worker announced.
CATALOG = f"{PREFIX}:catalog"

# Hash sha256(secret) -> ApiKey JSON: the user API keys. Secrets themselves are never stored.
API_KEYS = f"{PREFIX}:apikeys"
# Pub/sub channel: published to after every change of API_KEYS, so gateways drop the key
# lookups they cache (`gateway.tenancy.principals`).
KEYS_CHANGED = f"{PREFIX}:note:apikeys-changed"


def ratelimit_key(key_id: str, dimension: str) -> str:
    """A key's token bucket for `dimension` ("requests" or "tokens")."""
    return f"{PREFIX}:ratelimit:{key_id}:{dimension}"


# --- Models across the cluster ------------------------------------------------------------


def worker_queue(worker_id: str) -> str:
    """A worker's private Celery queue, never published to: it keeps the consumer alive
    while the worker holds no model, and sorts before every `p*` queue."""
    return f"corral.worker.{worker_id}"


def worker_commands(worker_id: str) -> str:
    """List of JSON commands (load / unload / reset) for one worker's model manager (BLPOP)."""
    return f"{PREFIX}:worker:{worker_id}:commands"


def placement_lock(alias: str) -> str:
    """`SET NX` by the gateway placing `alias`; the worker that takes the load deletes it."""
    return f"{PREFIX}:placing:{alias}"


def memory_key(alias: str) -> str:
    """Hash profile -> MemoryRecord JSON: `alias`'s estimated and measured memory."""
    return f"{PREFIX}:mem:{alias}"


def device_key(device: str) -> str:
    """Hash: one device's memory ledger (`common.devices`): `budget:<worker>` -> the MiB the
    device holds as each worker on it sees it, `reserved:<worker>` -> MiB that worker's model
    holds or is loading into. Every worker on the device reserves from it atomically."""
    return f"{PREFIX}:device:{device}"


# Hash alias -> why: models found unloadable before any worker tried (not a GGUF, a split
# file missing, bigger than every device), until `POST /v1/models/{alias}/reset`.
MODELS_FAILED = f"{PREFIX}:models:failed"

# Sorted set alias -> when a gateway last announced it from its config or models_dir: an
# entry nobody announces and no live worker holds leaves the catalog.
CATALOG_SEEN = f"{PREFIX}:catalog:seen"

# Hash alias -> JSON of request defaults set at run time (`POST /v1/models/{alias}/defaults`),
# over the config's `defaults`.
MODEL_DEFAULTS = f"{PREFIX}:models:defaults"


def gguf_shape_key(identity: str) -> str:
    """String: the GGUF header facts of one file version (`common.estimate.ModelShape` JSON,
    or `{"error": ...}`), shared by every gateway and worker; `identity` names the file
    version (path, size, mtime)."""
    return f"{PREFIX}:gguf:{identity}"


def cache_key(alias: str, digest: str) -> str:
    """String: one kept reply of `alias` (`gateway.cache`); `digest` names the request
    (model identity, normalized body, tenant)."""
    return f"{PREFIX}:cache:{alias}:{digest}"


def cache_index(alias: str) -> str:
    """Sorted set of `alias`'s kept replies by when they were kept: trimmed to the model's
    `cache.max_entries`, oldest first."""
    return f"{PREFIX}:cache-index:{alias}"


# Pub/sub channel of ModelEvent JSON: a model changed state on a worker.
EVENTS = f"{PREFIX}:events"

# Set of aliases ejected by an operator: preload does not bring them back until a load.
EJECTED = f"{PREFIX}:ejected"


# The OpenAI Files and Batch APIs (`common.batch`).
FILES = f"{PREFIX}:files"  # sorted set of file ids by creation time
FILE_OWNERS = f"{PREFIX}:files:owners"  # hash: file id -> the id of the key that made it
# Set once the per-owner indexes hold what was made before they existed
# (`gateway.batches.owner_index.backfill_once`).
OWNER_INDEXES = f"{PREFIX}:owner-indexes:v1"


def files_of(owner: str) -> str:
    """Sorted set: the ids of one API key's files by creation time, so that a user's
    listing reads its own page, not every tenant's ids (`FILES` is the admin's)."""
    return f"{PREFIX}:files:owner:{owner}"


def batches_of(owner: str) -> str:
    """Sorted set: the ids of one API key's batches by creation time (see `files_of`)."""
    return f"{PREFIX}:batches:owner:{owner}"


def file_key(file_id: str) -> str:
    """String: a file's metadata (`FileObject` JSON)."""
    return f"{PREFIX}:file:{file_id}"


def file_content_key(file_id: str) -> str:
    return f"{PREFIX}:file:{file_id}:content"


BATCHES = f"{PREFIX}:batches"  # sorted set of batch ids by creation time
BATCHES_ACTIVE = f"{PREFIX}:batches:active"  # set of batches not final yet
BATCH_LEADER = f"{PREFIX}:batches:leader"  # lock: the gateway that supervises batches now
AGING_LEADER = f"{PREFIX}:aging:leader"  # lock: the gateway promoting aged low requests now
AFFINITY_LEADER = f"{PREFIX}:affinity:leader"  # lock: the gateway sweeping affinity queues


def batch_key(batch_id: str) -> str:
    """Hash: a batch's record and counters."""
    return f"{PREFIX}:batch:{batch_id}"


def batch_results_key(batch_id: str) -> str:
    """Hash custom_id -> output line JSON; HSETNX makes each item's result exactly once."""
    return f"{PREFIX}:batch:{batch_id}:results"


def batch_attempts_key(batch_id: str) -> str:
    """Hash custom_id -> how often the supervisor re-sent an item lost with its worker."""
    return f"{PREFIX}:batch:{batch_id}:attempts"


def batch_enqueue_lease(batch_id: str) -> str:
    """Held (with a TTL) by the gateway enqueuing a batch's items; expired → resumable."""
    return f"{PREFIX}:batch:{batch_id}:enqueuing"

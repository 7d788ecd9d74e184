"""Request records: where each request is (queued, running, done...), for
`GET /v1/requests/{id}`, `GET /v1/queue/stats` and cancellation from any gateway.

A record is a Redis hash written by the gateway when it enqueues and updated by the worker
when it starts and ends the task (partial HSETs, no read-modify-write), with a TTL so
finished records fade away.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from pydantic import BaseModel

from common.priority import Priority
from common.redis_keys import text

RECORD_TTL_S = 3600  # how long a finished request stays visible
QUEUE_VIEW = frozenset({"position", "estimated_start_at"})  # read from the queue, not stored


class RequestState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"  # its deadline passed before a worker started it

    @property
    def final(self) -> bool:
        return self not in (RequestState.QUEUED, RequestState.RUNNING)


class RequestRecord(BaseModel):
    request_id: str
    model: str
    priority: Priority
    state: RequestState
    stream: bool = False
    channel: str | None = None
    enqueued_at: float
    deadline: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    worker: str | None = None
    error: str | None = None
    promoted_at: float | None = None  # moved from low to normal after `low_max_wait`
    owner: str | None = None  # the API key that sent it: only that key may read or cancel it
    client_request_id: str | None = None  # the client's own X-Request-ID, if it sent one
    position: int | None = None  # 1 = next to start; only while queued
    # When it should start (epoch s), from the slots free and its model's recent service
    # times; only while queued, and only once the model has served something lately.
    estimated_start_at: float | None = None
    ttft_ms: float | None = None  # enqueued -> first token, as its worker measured it
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None  # prompt tokens its engine had in its prompt cache
    # Prefix affinity (`gateway.queueing.affinity`): "hit" (sent to the replica that ran
    # its key last), "new" (no ready replica ran its key: the shared queue), "spill" (a hit
    # moved to the shared queue after `affinity_wait`); unset: no affinity.
    affinity: str | None = None
    affinity_worker: str | None = None  # the replica it was sent to (`worker` ran it)

    @classmethod
    def from_hash(cls, raw: Mapping[Any, Any]) -> RequestRecord:
        return cls.model_validate({text(k): text(v) for k, v in raw.items() if v})

    def to_hash(self) -> dict[Any, Any]:
        data = self.model_dump(mode="json", exclude_none=True, exclude=set(QUEUE_VIEW))
        return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in data.items()}


def running_member(worker_id: str, request_id: str) -> str:
    return f"{worker_id}|{request_id}"


def split_running_member(member: str) -> tuple[str, str]:
    worker, _, request_id = member.rpartition("|")
    return worker, request_id

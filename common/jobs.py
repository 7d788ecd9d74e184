"""The task payload: what the gateway enqueues for a worker (step 2 → 3 of the path)."""

from __future__ import annotations

import time
import uuid
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field

from common.priority import Priority


class JobKind(StrEnum):
    CHAT = "chat"
    COMPLETION = "completion"
    EMBEDDING = "embedding"

    @property
    def path(self) -> str:
        """llama-server's OpenAI-compatible endpoint for this kind."""
        return _PATHS[self]


_PATHS = {
    JobKind.CHAT: "/v1/chat/completions",
    JobKind.COMPLETION: "/v1/completions",
    JobKind.EMBEDDING: "/v1/embeddings",
}


def new_request_id() -> str:
    return f"req_{uuid.uuid4().hex}"


class Job(BaseModel):
    """One inference request as a Celery task argument (JSON; no pickles on the broker)."""

    request_id: str = Field(default_factory=new_request_id)
    kind: JobKind
    model: str
    body: dict[str, Any]
    stream: bool = False
    priority: Priority = Priority.NORMAL
    channel: str
    deadline: float  # epoch seconds; past it the worker drops the task unrun
    enqueued_at: float = Field(default_factory=time.time)
    # A batch item writes its result to the batch (exactly once per custom_id), not to a
    # pub/sub channel.
    batch_id: str | None = None
    custom_id: str | None = None
    owner: str | None = None  # the id of the API key that sent it (`gateway.tenancy.ownership`)
    # What it shares with earlier requests (`common.affinity`): its worker remembers it
    # ran this key, so the next request with the key goes to that replica's prompt cache.
    affinity: str | None = None

    def expired(self, now: float | None = None) -> bool:
        return (now if now is not None else time.time()) >= self.deadline

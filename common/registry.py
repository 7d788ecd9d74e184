"""A worker's registry entry: what it advertises in Redis under a TTL (its heartbeat)."""

from __future__ import annotations

import time
from enum import StrEnum

from pydantic import BaseModel, Field


class WorkerState(StrEnum):
    STARTING = "starting"
    LOADING = "loading"
    READY = "ready"
    STOPPING = "stopping"
    FAILED = "failed"


class WorkerInfo(BaseModel):
    id: str
    host: str
    pid: int
    model: str | None = None
    slots: int
    state: WorkerState
    gpu: str | None = None  # "cpu", or the GPU index it is pinned to
    upstream: str | None = None  # the llama-server base URL, on the worker's host
    started_at: float = Field(default_factory=time.time)
    error: str | None = None

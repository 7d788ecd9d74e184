"""A worker's registry entry: what it advertises in Redis under a TTL (its heartbeat)."""

from __future__ import annotations

import time
from enum import StrEnum

from pydantic import BaseModel, Field


class WorkerState(StrEnum):
    STARTING = "starting"
    EMPTY = "empty"  # no model: free for placement
    LOADING = "loading"  # `model` is being loaded (or its crashed child restarted)
    READY = "ready"  # `model` is served: the worker consumes its queues
    UNLOADING = "unloading"  # `model` is being unloaded (then `next_model`, if set, loads)
    STOPPING = "stopping"
    FAILED = "failed"


class ModelState(StrEnum):
    """A model's state on one worker, or across the cluster (the status API's words)."""

    OFF = "off"
    LOADING = "loading"
    READY = "ready"
    UNLOADING = "unloading"
    FAILED = "failed"


class ModelEvent(BaseModel):
    """A model changed state on a worker (published on `keys.EVENTS`)."""

    model: str
    worker: str
    state: ModelState
    error: str | None = None
    at: float = Field(default_factory=time.time)


class WorkerInfo(BaseModel):
    id: str
    host: str
    pid: int
    model: str | None = None
    slots: int
    state: WorkerState
    gpu: str | None = None  # "cpu", or the GPU index it is pinned to
    device: str | None = None  # its device's memory ledger (`common.devices`)
    upstream: str | None = None  # the llama-server base URL, on the worker's host
    metrics_port: int | None = None  # the worker's own Prometheus /metrics
    # ...on this address (the one it listens on; for an any-address listener, this host's
    # address towards the cluster's Redis); unset: on `host`
    metrics_host: str | None = None
    started_at: float = Field(default_factory=time.time)
    error: str | None = None
    # Models on this worker: one at a time, within a memory budget.
    budget_mb: int | None = None  # its device's budget as it sees it: VRAM, or RAM on the CPU
    used_mb: int | None = None  # measured use of its llama-server (reserved need while loading)
    slots_busy: int = 0
    next_model: str | None = None  # loads once `model` has unloaded (a swap)
    pinned: bool = False  # `model` is never evicted from this worker
    loaded_at: float | None = None
    last_used: float | None = None
    restarts: int = 0  # crashes of `model`'s llama-server, each restarted
    failed: dict[str, str] = Field(default_factory=dict)  # alias -> why, until reset
    # alias -> the whole story (llama-server's last lines, paths): for admins, never clients
    failed_detail: dict[str, str] = Field(default_factory=dict)
    ctx_size: int | None = None  # the context `model` was loaded with (`ctx_size: auto`)

    def metrics_target(self) -> str | None:
        """`host:port` of its /metrics, as Prometheus's service discovery lists it."""
        if not self.metrics_port:
            return None
        host = self.metrics_host or self.host
        return f"[{host}]:{self.metrics_port}" if ":" in host else f"{host}:{self.metrics_port}"

    def model_state(self, alias: str) -> ModelState:
        """`alias`'s state on this worker."""
        if self.model == alias:
            return _STATE_OF.get(self.state, ModelState.OFF)
        if self.next_model == alias:
            return ModelState.LOADING
        if alias in self.failed:
            return ModelState.FAILED
        return ModelState.OFF


_STATE_OF = {
    WorkerState.LOADING: ModelState.LOADING,
    WorkerState.READY: ModelState.READY,
    WorkerState.UNLOADING: ModelState.UNLOADING,
    WorkerState.STOPPING: ModelState.UNLOADING,
}

"""Commands the gateway sends a worker's model manager: a JSON list per worker in Redis
(`keys.worker_commands`), popped by the manager thread (BLPOP), so the one thread that owns
the llama-server child is also the only one that acts on them."""

from __future__ import annotations

import time
from enum import StrEnum

from pydantic import BaseModel, Field

from common.settings import ModelConfig

COMMAND_TTL_S = 600  # a dead worker's unread commands vanish (see `command_ttl`)


def command_ttl(load_timeout: float) -> int:
    """How long a worker's command list outlives its last push: longer than the manager
    may be busy with one transition (a load waits up to `load_timeout`), so an UNLOAD or a
    RESET sent meanwhile is still there when it is done."""
    return max(COMMAND_TTL_S, int(3 * load_timeout))


class CommandOp(StrEnum):
    LOAD = "load"  # load `model` (unloading `evict` first); idempotent
    UNLOAD = "unload"  # eject `model` if held
    RESET = "reset"  # forget that `model` failed here
    CHECK = "check"  # look at the child now (it exited: sent by the worker to itself)
    DRAIN = "drain"  # the worker is stopping: serve nothing more (sent by itself)


class WorkerCommand(BaseModel):
    op: CommandOp
    model: str
    config: ModelConfig | None = None  # as the gateway knows it (the worker's config wins)
    evict: str | None = None  # the idle model the placer chose to swap out
    # UNLOAD only: an eviction to make room for this model, done only if `model` is still
    # idle and unpinned here (the placer saw an older picture); None: an operator's eject
    room_for: str | None = None
    lock: str | None = None  # placement lock token, released once the load is visible
    sent_at: float = Field(default_factory=time.time)

"""The worker's model-manager thread: the one owner of the engine child. It takes
commands (`manager`), runs every model transition (`lifecycle`), restarts a crashed child
(`restarts`), and tells the cluster (`reporter`, `heartbeat`)."""

from __future__ import annotations

from workers.models.manager import Manager

__all__ = ["Manager"]

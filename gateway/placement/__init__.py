"""Models across the cluster: which worker loads a model nobody serves (`policy`, a pure
function), the placer that acts on it (`placer`), what a model needs in memory on a worker
(`needs`), and the requests waiting for a load (`waiters`)."""

from __future__ import annotations

from gateway.placement.placer import Placer

__all__ = ["Placer"]

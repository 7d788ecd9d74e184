"""Model and worker status as the management API shows it (names after RouterModelCustom's,
so its users can switch: `status` off / loading / ready / unloading / failed, `vram_used_mb`,
`failed_models`), built from one registry read."""

from __future__ import annotations

from typing import Any

from common.registry import ModelState, WorkerInfo
from common.settings import ModelConfig
from gateway.cluster import View, worker_summary


def model_status(
    alias: str, model: ModelConfig, view: View, queued: dict[str, int], preloaded: bool
) -> dict[str, Any]:
    holders = [w for w in view.workers if w.model_state(alias) is not ModelState.OFF]
    ready = [w for w in holders if w.model_state(alias) is ModelState.READY]
    return {
        "model": alias,
        "status": view.state_of(alias).value,
        "replicas": len(ready),
        "replicas_wanted": model.replicas,
        "embedding": model.embedding,
        "vram_used_mb": sum(w.used_mb or 0 for w in ready) or None,
        "last_used": max((w.last_used or 0 for w in ready), default=None) or None,
        "queued": queued,
        "preload": preloaded,
        "pinned": model.pinned,
        "idle_ttl": model.idle_ttl,
        "workers": [_placement(w, alias) for w in holders],
        "failed": {w.id: w.failed[alias] for w in view.workers if alias in w.failed}
        | ({"cluster": view.broken[alias]} if alias in view.broken else {}),
    }


def _placement(w: WorkerInfo, alias: str) -> dict[str, Any]:
    return {
        "worker": w.id,
        "status": w.model_state(alias).value,
        "gpu": w.gpu,
        "used_mb": w.used_mb if w.model == alias else None,
        "budget_mb": w.budget_mb,
        "slots": w.slots,
        "slots_busy": w.slots_busy if w.model == alias else 0,
        "restarts": w.restarts if w.model == alias else 0,
        "ctx_size": w.ctx_size if w.model == alias else None,
        "error": w.failed.get(alias),
    }


def count_by_status(statuses: list[dict[str, Any]]) -> dict[str, int]:
    out = {s.value: 0 for s in ModelState}
    for st in statuses:
        out[st["status"]] += 1
    return {**out, "total": len(statuses)}


def vram(view: View) -> dict[str, Any]:
    """`GET /vram`: every worker's budget and use, and the totals."""
    workers = [worker_summary(w) for w in view.workers]
    budget = sum(w.budget_mb or 0 for w in view.workers)
    used = sum(w.used_mb or 0 for w in view.workers if w.model)
    return {
        "workers": workers,
        "total_budget_mb": budget,
        "total_used_mb": used,
        "free_mb": max(budget - used, 0),
        "loaded_models": sorted({w.model for w in view.workers if w.model}),
    }

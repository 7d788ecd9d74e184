"""`corral status`: the cluster at a glance — a table of workers (GPU, budget used/total,
model, state, slots busy) and one of models (state, replicas, queue depths, recent
prompt/generation tokens per second) — from the
gateway's `GET /v1/workers` and `GET /v1/models/status`; `--watch` redraws it every second.
"""

from __future__ import annotations

import time
from typing import Any

from corral.api import Api

CLEAR = "\x1b[H\x1b[2J"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    lines = [header, *rows]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in lines
    )


def mib(value: Any) -> str:
    return "-" if value is None else str(int(value))


def render(workers: list[dict[str, Any]], models: dict[str, dict[str, Any]]) -> str:
    wrows = [
        [
            w["worker"],
            w.get("gpu") or "cpu",
            f"{mib(w.get('used_mb'))}/{mib(w.get('budget_mb'))}",
            w.get("model") or "-",
            _state(w),
            f"{w.get('slots_busy', 0)}/{w.get('slots', 0)}",
        ]
        for w in workers
    ]
    mrows = [
        [
            alias,
            m["status"],
            f"{m['replicas']}/{m.get('replicas_wanted', 1)}",
            "/".join(str(m["queued"].get(p, 0)) for p in ("high", "normal", "low")),
            str(m["queued"].get("batch", 0)),
            _speed(m.get("speed") or {}),
            ", ".join(w["worker"] for w in m["workers"]) or "-",
        ]
        for alias, m in models.items()
    ]
    out = [table(wrows, ["WORKER", "GPU", "MEM MiB used/budget", "MODEL", "STATE", "SLOTS"])]
    header = ["MODEL", "STATUS", "REPLICAS", "QUEUED h/n/l", "BATCH", "TOK/S prompt/gen", "ON"]
    out += ["", table(mrows, header)]
    failed = [(a, w, e) for a, m in models.items() for w, e in m.get("failed", {}).items()]
    if failed:
        out += ["", "FAILED:"] + [f"  {a} on {w}: {e.splitlines()[0]}" for a, w, e in failed]
    return "\n".join(out)


def _speed(speed: dict[str, Any]) -> str:
    """llama-server's prompt/generation tokens per second over the recent window."""
    if not speed.get("requests"):
        return "-"
    return "/".join(
        "-" if v is None else str(round(v)) for v in (speed.get(k) for k in SPEED_FIELDS)
    )


SPEED_FIELDS = ("prompt_tokens_per_s", "gen_tokens_per_s")


def _state(w: dict[str, Any]) -> str:
    if w.get("next_model"):
        return f"{w['state']} -> {w['next_model']}"
    if w.get("restarts"):
        return f"{w['state']} (restarts {w['restarts']})"
    return str(w["state"])


def snapshot(api: Api) -> str:
    workers = api.get("/v1/workers")["data"]
    models = api.get("/v1/models/status")["models"]
    return render(workers, models)


def run(api: Api, watch: bool, interval: float = 1.0) -> int:
    if not watch:
        print(snapshot(api))
        return 0
    try:
        while True:
            text = snapshot(api)
            print(f"{CLEAR}{api.base}  {time.strftime('%H:%M:%S')}\n\n{text}", flush=True)
            time.sleep(interval)
    except KeyboardInterrupt:
        return 0

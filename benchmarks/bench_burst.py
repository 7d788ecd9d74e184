"""A burst: hundreds of requests at once, Corral against a direct llama-server, and how
long `GET /health` takes meanwhile.

Starts one llama-server directly (the argv a worker uses, `--parallel` = `--slots`), sends
`--burst` streaming chat completions of `--tokens` tokens at once, and probes its `/health`
every 50 ms until the last reply; stops it; then the same against one Corral (embedded
Valkey, `corral gateway`, one `corral worker --model` with as many slots), probing the
gateway's `/health`. With `--rounds R` the two alternate (direct, corral, corral,
direct, ...) and each figure is the median over rounds.

Per system: completed/s (requests / the time to the last reply), errors, TTFT p50/p99
(queue wait included), `/health` p50/p99, and the cores each part used. Targets (not
asserted): Corral completes >= 0.9x what the direct server does, with no error, and its
`/health` p99 stays under 50 ms.

Run:  python benchmarks/bench_burst.py [--burst 500] [--rounds 2] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from rig import (
    Cluster,
    CpuMeter,
    HealthProbe,
    Sample,
    chat_body,
    entry,
    fetch,
    pct,
    progress,
    running,
)

from corral.tinymodel import make_model
from workers.engine.binary import cpu_threads, resolve_binary
from workers.engine.server import EngineServer, LaunchSpec

ALIAS = "bench"
PATH = "/v1/chat/completions"
TARGET_RATIO = 0.9
TARGET_HEALTH_P99_MS = 50.0

EPILOG = """\
examples:
  python benchmarks/bench_burst.py                         500 requests of 1 token, 2 rounds
  python benchmarks/bench_burst.py --burst 200 --tokens 16 --rounds 3
  python benchmarks/bench_burst.py --threads 1 --json

The client sends every request on its own connection at once (Connection: close), from
this process, with a lean asyncio HTTP client (benchmarks/rig.py). The exit status is 1 if
any request failed, else 0, whatever the figures.
"""


@contextlib.contextmanager
def direct(model: Path, args: argparse.Namespace, logs: Path) -> Iterator[tuple[int, Any]]:
    env = {"LLAMA_ARG_THREADS": str(args.threads)} if args.threads else {}
    spec = LaunchSpec(
        model_path=model,
        alias=ALIAS,
        ctx_size=args.slots * 512,
        parallel=args.slots,
        binary=resolve_binary(),
        env=env,
        log_name="bench-direct",
        cpu_threads=cpu_threads(),  # what a Corral CPU worker gives its llama-server
    )
    server = EngineServer(spec)
    try:
        server.start()
        server.ensure_ready(timeout=120)
        yield int(urlsplit(server.base_url).port or 0), None
    finally:
        server.stop()


@contextlib.contextmanager
def corral(model: Path, args: argparse.Namespace, logs: Path) -> Iterator[tuple[int, Any]]:
    cfg = logs / "corral.yaml"
    doc = {
        "max_queue_size_per_model": max(1000, 2 * args.burst),
        "models": {ALIAS: {"model_path": str(model), "ctx_size": 512 * args.slots}},
    }
    cfg.write_text(yaml.safe_dump(doc))
    env = {"LLAMA_ARG_THREADS": str(args.threads)} if args.threads else {}
    worker = ["--model", ALIAS, "--slots", str(args.slots)]
    cluster = Cluster(logs, cfg, gateways=1, workers=[worker], env=env)
    with running(cluster, timeout=180):
        yield cluster.ports[0], CpuMeter(cluster)


async def one_burst(port: int, meter: CpuMeter | None, args: Any) -> dict[str, Any]:
    async def send(i: int, tokens: int) -> Sample:
        return await fetch(port, PATH, chat_body(f"{i} burst", tokens, True, ALIAS), 600)

    # Warm-up: a burst as large, so that neither system meets its first burst measured.
    warm = await asyncio.gather(*(send(i, args.tokens) for i in range(args.burst)))
    if any(s.error for s in warm):
        raise RuntimeError(f"warm-up failed: {next(s.error for s in warm if s.error)}")
    if meter is not None:
        meter.refresh()  # the pool children, forked by now
    await asyncio.sleep(1.0)
    probe = HealthProbe(port, 0.05)
    await probe.start()
    await asyncio.sleep(0.5)
    before = meter.snapshot() if meter else None
    samples = list(await asyncio.gather(*(send(i, args.tokens) for i in range(args.burst))))
    cores = CpuMeter.used(before, meter.snapshot()).cores() if meter and before else {}
    health = await probe.stop()
    ok = [s for s in samples if s.error is None and s.tokens == args.tokens]
    bad = [s for s in samples if s.error is not None or s.tokens != args.tokens]
    wall = max(s.done or 0 for s in samples) - min(s.sent for s in samples)
    return {
        "completed_per_s": len(ok) / wall,
        "errors": len(bad),
        "first_error": (bad[0].error or f"{bad[0].tokens} tokens") if bad else None,
        "ttft_p50_ms": pct([s.ttft * 1000 for s in ok if s.ttft is not None], 50),
        "ttft_p99_ms": pct([s.ttft * 1000 for s in ok if s.ttft is not None], 99),
        "health_p50_ms": pct([abs(h) * 1000 for h in health], 50),
        "health_p99_ms": pct([abs(h) * 1000 for h in health], 99),
        "health_failed": sum(h < 0 for h in health),
        "cores": {k: round(v, 3) for k, v in cores.items()},
    }


STARTERS = {"direct": direct, "corral": corral}


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [k for k, v in runs[0].items() if isinstance(v, int | float)]
    out = {k: statistics.median(r[k] for r in runs) for k in keys}
    out["errors"] = sum(r["errors"] for r in runs)
    return out


def report(per: dict[str, list[dict[str, Any]]], args: Any) -> None:
    print(f"burst: {args.burst} streaming requests of {args.tokens} token(s) at once, ", end="")
    print(f"{args.slots} slots, median of {args.rounds} round(s)")
    head = (
        f"{'':7} | {'done/s':>7} | {'errors':>6} | {'TTFT p50/p99 ms':>17} | "
        f"{'/health p50/p99 ms':>18} | health failed"
    )
    print(head)
    print("-" * len(head))
    med = {system: medians(runs) for system, runs in per.items()}
    for system, m in med.items():
        print(
            f"{system:7} | {m['completed_per_s']:>7.1f} | {m['errors']:>6} | "
            f"{m['ttft_p50_ms']:>8.0f} / {m['ttft_p99_ms']:>6.0f} | "
            f"{m['health_p50_ms']:>8.1f} / {m['health_p99_ms']:>7.1f} | {m['health_failed']:.0f}"
        )
    for runs in per.get("corral", [])[:1]:
        print("corral cores: " + ", ".join(f"{k} {v:.2f}" for k, v in runs["cores"].items()))
    if len(med) == 2:
        ratio = med["corral"]["completed_per_s"] / med["direct"]["completed_per_s"]
        health = med["corral"]["health_p99_ms"]
        print(f"target: completed/s >= {TARGET_RATIO}x direct: {ratio:.2f}x -> ", end="")
        print("met" if ratio >= TARGET_RATIO and med["corral"]["errors"] == 0 else "MISSED")
        print(f"target: /health p99 < {TARGET_HEALTH_P99_MS:g} ms: {health:.1f} ms -> ", end="")
        print("met" if health < TARGET_HEALTH_P99_MS else "MISSED")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench_burst.py",
        description=(__doc__ or "").split("\nRun:")[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = p.add_argument
    add("--burst", type=int, default=500, help="requests sent at once (default: 500)")
    add("--tokens", type=int, default=1, help="tokens a request (default: 1)")
    add("--slots", type=int, default=8, help="llama-server --parallel = worker slots (8)")
    add("--rounds", type=int, default=2, help="alternate the two R times (default: 2)")
    add("--threads", type=int, default=None, help="llama-server threads, for both")
    add("--only", choices=tuple(STARTERS), help="measure one of the two")
    add("--keep-logs", type=Path, default=None, metavar="DIR", help="keep the logs here")
    add("--json", action="store_true", help="print JSON on stdout")
    return p


def run(args: argparse.Namespace) -> int:
    per: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="corral-burst-") as tmp:
        root = Path(tmp)
        logs = args.keep_logs or root
        logs.mkdir(parents=True, exist_ok=True)
        model = make_model(root / f"{ALIAS}.gguf")
        for rnd in range(args.rounds):
            order = list(STARTERS) if rnd % 2 == 0 else list(STARTERS)[::-1]
            for system in (s for s in order if args.only in (None, s)):
                with STARTERS[system](model, args, logs) as (port, meter):
                    res = asyncio.run(one_burst(port, meter, args))
                per.setdefault(system, []).append(res)
                progress(
                    f"[round {rnd + 1} {system}] {res['completed_per_s']:.1f} done/s, "
                    f"{res['errors']} errors, TTFT p50 {res['ttft_p50_ms']:.0f} ms, /health "
                    f"p99 {res['health_p99_ms']:.1f} ms; cores {res['cores']}"
                )
    if args.json:
        print(json.dumps({"config": vars(args) | {"keep_logs": None}, "runs": per}))
    else:
        report(per, args)
    return 1 if any(r["errors"] for runs in per.values() for r in runs) else 0


def main(argv: list[str] | None = None) -> int:
    return entry(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())

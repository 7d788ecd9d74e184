"""Scale: one Valkey, 1 then 2 gateways, 8, 16 and 32 workers of 4 slots, on one machine.

The engine of every worker is the LOAD SIMULATOR (`benchmarks/load_simulator.py`), not a
model: a stand-in OpenAI-compatible server that streams the same word at a set rate per
stream using almost no CPU. It runs as the model's `engine.command`, so each request takes
Corral's whole path (gateway, queue, worker, pool child, HTTP stream from the engine,
pub/sub, SSE); only llama-server's compute is missing, which is what lets dozens of
workers share two cores. Every figure here is Corral's own cost, never a model's speed.

For each worker count (workers are added to the running cluster) and each gateway count
(two gateways run throughout; with 1, the load goes to the first alone):

- steady: closed loop, as many requests in flight as there are slots, each streaming
  `--tokens` tokens, for `--seconds`: completed/s, tokens/s relayed, and their ratio to
  what the simulator alone would deliver (slots x its rate); TTFT p50/p99, all of it
  added by Corral (the simulator sends its first token at once);
- burst: `--burst` streaming requests of `--burst-tokens` tokens sent at once (the
  model's queue cap raised to hold them): completed/s (requests ÷ time to the last
  reply), errors, TTFT p50/p99 (queue wait included) and `GET /health` latency p50/p99
  probed every 50 ms meanwhile.

Per phase, the cores each part used (`/proc`): each gateway, the workers' main processes,
their pool children, the simulators, Valkey and this client, the busiest single process of
each, and the whole machine. The first part to saturate is the one whose busiest process
ran at >= 0.9 of a core (a gateway's event loop and Valkey are one thread each), or the
machine itself once all of its cores are busy.

Run:  python benchmarks/bench_scale.py [--workers 8,16,32] [--gateways 1,2] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import yaml
from rig import (
    Cluster,
    CpuMeter,
    HealthProbe,
    Sample,
    Used,
    chat_body,
    closed_loop,
    entry,
    fetch,
    pct,
    progress,
    running,
)

ALIAS = "sim"
PATH = "/v1/chat/completions"
SIMULATOR = Path(__file__).resolve().with_name("load_simulator.py")
SATURATED = 0.9  # cores: one process that ran this much is at its ceiling

EPILOG = """\
examples:
  python benchmarks/bench_scale.py                              8,16,32 workers; 1 and 2 gateways
  python benchmarks/bench_scale.py --workers 8 --burst 500 --seconds 10
  python benchmarks/bench_scale.py --tokens-per-s 20 --json

Every worker is a real `corral worker --model sim --slots N` process with its pool children;
only the engine is the load simulator. Workers take ~0.5 s of CPU each to start; a worker
with 4 slots holds 6 processes (its main, 4 pool children, its simulator), so 32 of them
are ~200 processes: mind the memory (the script prints a worker's and stops short of
what the machine holds).
"""


def config(root: Path, args: argparse.Namespace) -> Path:
    (root / "sim.model").write_text("load simulator: no weights\n")
    engine = {
        "command": [
            sys.executable,
            str(SIMULATOR),
            "--port",
            "{port}",
            "--alias",
            "{alias}",
            "--tokens-per-s",
            str(args.tokens_per_s),
        ],
        "metrics": None,
        "name": "load-simulator",
    }
    model = {
        "model_path": str(root / "sim.model"),
        "engine": engine,
        "ctx_size": 4096,
        "parallel": args.slots,
        "vram_mb": 64,  # the simulator's memory, for placement's ledger
    }
    doc = {"max_queue_size_per_model": max(10_000, 2 * args.burst), "models": {ALIAS: model}}
    path = root / "corral.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def tree_memory(pid: int) -> dict[str, float]:
    """MiB of a worker's processes: RSS of each part, and PSS of the whole tree."""
    out = {"main_rss": 0.0, "pool_rss": 0.0, "engine_rss": 0.0, "pss": 0.0, "children": 0}
    try:
        main = psutil.Process(pid)
        group = os.getpgid(pid)
        procs = [main, *main.children(recursive=True)]
        for p in procs:
            mem = p.memory_full_info()
            part = "main" if p.pid == pid else "pool" if os.getpgid(p.pid) == group else "engine"
            out[f"{part}_rss"] += mem.rss / 2**20
            out["pss"] += mem.pss / 2**20
        out["children"] = len(procs) - 1
    except (psutil.Error, OSError):
        pass
    return out


def check_memory(cluster: Cluster, wanted: int) -> int:
    """How many workers fit: a running worker's PSS against the memory still available
    (keeping a quarter of it free), at most `wanted`."""
    pids = cluster.role_pids()
    worker = next(p for n, p in pids.items() if n.startswith("worker"))
    mem = tree_memory(worker)
    free = psutil.virtual_memory().available / 2**20
    more = int(0.75 * free / max(mem["pss"], 1.0))
    progress(
        f"a worker: main {mem['main_rss']:.0f} MiB RSS, {mem['children']:.0f} children "
        f"(pool {mem['pool_rss']:.0f} MiB RSS, engine {mem['engine_rss']:.0f}); the tree's "
        f"PSS {mem['pss']:.0f} MiB; {free:.0f} MiB available: room for ~{more} more"
    )
    return min(wanted, len(cluster.workers) + more)


async def steady(cluster: Cluster, meter: CpuMeter, gateways: int, args: Any) -> dict[str, Any]:
    slots = len(cluster.workers) * args.slots
    ports = itertools.cycle(cluster.ports[:gateways])

    async def send(i: int) -> Sample:
        return await fetch(
            next(ports), PATH, chat_body(f"s{i} {nonce()}", args.tokens, True, ALIAS)
        )

    before = meter.snapshot()
    samples = await closed_loop(send, slots, args.seconds)
    used = CpuMeter.used(before, meter.snapshot())
    ok = [s for s in samples if s.error is None and s.tokens == args.tokens]
    ideal_tps = slots * args.tokens_per_s
    return {
        "phase": "steady",
        "requests": len(samples),
        "errors": len(samples) - len(ok),
        "first_error": next(
            (s.error or f"{s.tokens} tokens" for s in samples if s not in ok), None
        ),
        "completed_per_s": len(ok) / used.wall,
        "tokens_per_s": sum(s.tokens for s in ok) / used.wall,
        "ideal_tokens_per_s": ideal_tps,
        "ttft_p50_ms": pct([s.ttft * 1000 for s in ok if s.ttft is not None], 50),
        "ttft_p99_ms": pct([s.ttft * 1000 for s in ok if s.ttft is not None], 99),
        **cpu_fields(used),
    }


async def burst(cluster: Cluster, meter: CpuMeter, gateways: int, args: Any) -> dict[str, Any]:
    ports = cluster.ports[:gateways]
    probe = HealthProbe(ports[0], 0.05)
    await probe.start()
    await asyncio.sleep(0.3)

    async def send(i: int) -> Sample:
        body = chat_body(f"b{i} {nonce()}", args.burst_tokens, True, ALIAS)
        return await fetch(ports[i % len(ports)], PATH, body, timeout=600)

    before = meter.snapshot()
    samples = list(await asyncio.gather(*(send(i) for i in range(args.burst))))
    used = CpuMeter.used(before, meter.snapshot())
    health = await probe.stop()
    ok, bad = split(samples, args.burst_tokens)
    return {
        "phase": "burst",
        "requests": len(samples),
        "errors": len(bad),
        "first_error": (bad[0].error or f"{bad[0].tokens} tokens") if bad else None,
        "completed_per_s": len(ok) / used.wall,
        "wall_s": used.wall,
        "ttft_p50_ms": pct([s.ttft * 1000 for s in ok if s.ttft is not None], 50),
        "ttft_p99_ms": pct([s.ttft * 1000 for s in ok if s.ttft is not None], 99),
        "health_p50_ms": pct([abs(h) * 1000 for h in health], 50),
        "health_p99_ms": pct([abs(h) * 1000 for h in health], 99),
        "health_failed": sum(h < 0 for h in health),
        **cpu_fields(used),
    }


def nonce() -> str:
    """A prompt part no earlier request had: every request's prefix-affinity key is new, so
    it goes to whichever worker is free (a repeated prompt would go where it ran before)."""
    return f"{time.time_ns():x}"


def split(samples: list[Sample], tokens: int) -> tuple[list[Sample], list[Sample]]:
    """The requests that got all their tokens, and the others."""
    ok = [s for s in samples if s.error is None and s.tokens == tokens]
    return ok, [s for s in samples if s.error is not None or s.tokens != tokens]


def cpu_fields(used: Used) -> dict[str, Any]:
    cores = used.cores()
    busiest = used.busiest_cores()
    machine = used.machine / used.wall if used.wall else 0.0
    return {
        "cores": {k: round(v, 3) for k, v in cores.items()},
        "busiest_cores": {k: round(v, 3) for k, v in busiest.items()},
        "machine_cores": round(machine, 3),
        "saturated": saturated(busiest, machine),
    }


def saturated(busiest: dict[str, float], machine: float) -> str:
    """The part at its ceiling: a process at >= SATURATED of a core, the busiest first;
    else the machine if its cores are all but full; else none."""
    top = max(
        ((k, v) for k, v in busiest.items() if k != "client"), key=lambda kv: kv[1], default=None
    )
    if top and top[1] >= SATURATED:
        return f"{top[0]} ({top[1]:.2f} cores)"
    cpus = os.cpu_count() or 1
    if machine >= cpus - 0.15:
        return f"the machine ({machine:.2f} of {cpus} cores)"
    return "none"


def parse_counts(text: str) -> list[int]:
    try:
        counts = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not counts or counts[0] < 1:
        raise argparse.ArgumentTypeError("counts must be integers >= 1")
    return counts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench_scale.py",
        description=(__doc__ or "").split("\nRun:")[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = p.add_argument
    add("--workers", type=parse_counts, default=[8, 16, 32], help="worker counts (8,16,32)")
    add("--gateways", type=parse_counts, default=[1, 2], help="gateway counts (1,2)")
    add("--slots", type=int, default=4, help="slots a worker (default: 4)")
    add("--tokens-per-s", type=float, default=50.0, help="simulator tokens/s a stream (50)")
    add("--tokens", type=int, default=128, help="tokens a steady request (128)")
    add("--seconds", type=float, default=20.0, help="seconds of steady load (20)")
    add("--burst", type=int, default=2000, help="requests in a burst (2000)")
    add("--burst-tokens", type=int, default=16, help="tokens a burst request (16)")
    add("--keep-logs", type=Path, default=None, metavar="DIR", help="keep the logs here")
    add("--json", action="store_true", help="print JSON on stdout")
    return p


async def warm_up(cluster: Cluster, args: Any) -> None:
    """Twice as many 1-token requests as there are slots, at once, through each gateway:
    every pool child has run a task (and exists: the meter reads the process tree once)."""
    slots = len(cluster.workers) * args.slots
    samples = await asyncio.gather(
        *(
            fetch(
                cluster.ports[i % len(cluster.ports)],
                PATH,
                chat_body(f"w{i} {nonce()}", 1, True, ALIAS),
            )
            for i in range(2 * slots)
        )
    )
    if bad := [s for s in samples if s.error]:
        raise RuntimeError(f"warm-up: {len(bad)} errors, the first: {bad[0].error}")
    await asyncio.sleep(1.0)


async def measure(cluster: Cluster, args: Any) -> list[dict[str, Any]]:
    meter = CpuMeter(cluster)
    rows = []
    for gateways in args.gateways:
        for phase in (steady, burst):
            await asyncio.sleep(2.0)  # the last phase's acks and records
            res = await phase(cluster, meter, gateways, args)
            res |= {"workers": len(cluster.workers), "gateways": gateways}
            rows.append(res)
            progress(line(res))
    return rows


def line(r: dict[str, Any]) -> str:
    what = f"[{r['workers']} workers, {r['gateways']} gw, {r['phase']}]"
    extra = (
        f"{r['tokens_per_s']:.0f} tok/s ({r['tokens_per_s'] / r['ideal_tokens_per_s']:.2f}x ideal)"
        if r["phase"] == "steady"
        else f"health p99 {r['health_p99_ms']:.0f} ms"
    )
    cores = ", ".join(f"{k} {v:.2f}" for k, v in r["cores"].items())
    return (
        f"{what} {r['completed_per_s']:.1f} done/s, {extra}, TTFT p50 {r['ttft_p50_ms']:.0f} "
        f"p99 {r['ttft_p99_ms']:.0f} ms, {r['errors']} errors; cores: {cores}; machine "
        f"{r['machine_cores']:.2f}; saturated: {r['saturated']}"
        + (f"; first error: {r['first_error']}" if r["first_error"] else "")
    )


def report(rows: list[dict[str, Any]], args: Any) -> None:
    print(
        f"steady: {args.tokens}-token streams, all slots busy, {args.seconds:g} s; simulator "
        f"{args.tokens_per_s:g} tokens/s a stream"
    )
    head = (
        f"{'workers':>7} {'gw':>2} | {'done/s':>7} | {'tokens/s':>8} | {'x ideal':>7} | "
        f"{'TTFT p50/p99 ms':>16} | {'gw cores':>9} | {'valkey':>6} | {'machine':>7} | saturated"
    )
    print(head)
    print("-" * len(head))
    for r in (r for r in rows if r["phase"] == "steady"):
        print(
            f"{r['workers']:>7} {r['gateways']:>2} | {r['completed_per_s']:>7.1f} | "
            f"{r['tokens_per_s']:>8.0f} | {r['tokens_per_s'] / r['ideal_tokens_per_s']:>7.2f} | "
            f"{r['ttft_p50_ms']:>7.1f} / {r['ttft_p99_ms']:>6.1f} | {gw(r):>9} | "
            f"{r['cores'].get('valkey', 0):>6.2f} | {r['machine_cores']:>7.2f} | {r['saturated']}"
        )
    print(f"\nburst: {args.burst} requests of {args.burst_tokens} tokens at once")
    head = (
        f"{'workers':>7} {'gw':>2} | {'done/s':>7} | {'errors':>6} | {'TTFT p50/p99 ms':>16} | "
        f"{'health p50/p99 ms':>17} | {'gw cores':>9} | {'valkey':>6} | {'machine':>7} | saturated"
    )
    print(head)
    print("-" * len(head))
    for r in (r for r in rows if r["phase"] == "burst"):
        print(
            f"{r['workers']:>7} {r['gateways']:>2} | {r['completed_per_s']:>7.1f} | "
            f"{r['errors']:>6} | {r['ttft_p50_ms']:>7.0f} / {r['ttft_p99_ms']:>6.0f} | "
            f"{r['health_p50_ms']:>7.1f} / {r['health_p99_ms']:>7.1f} | {gw(r):>9} | "
            f"{r['cores'].get('valkey', 0):>6.2f} | {r['machine_cores']:>7.2f} | {r['saturated']}"
        )


def gw(r: dict[str, Any]) -> str:
    return "+".join(f"{r['cores'].get(f'gateway-{i}', 0):.2f}" for i in range(r["gateways"]))


def run(args: argparse.Namespace) -> int:
    top = max(args.gateways)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="corral-scale-") as tmp:
        root = Path(tmp)
        logs = args.keep_logs or root
        logs.mkdir(parents=True, exist_ok=True)
        worker = ["--model", ALIAS, "--slots", str(args.slots)]
        cluster = Cluster(logs, config(root, args), gateways=top)
        with running(cluster, timeout=600):
            limit = max(args.workers)
            for count in args.workers:
                t0 = time.monotonic()
                if count > limit:
                    progress(f"{count} workers: skipped, the machine's memory holds ~{limit}")
                    continue
                cluster.add_workers([worker] * (count - len(cluster.workers)), timeout=900)
                progress(f"{count} workers ready ({time.monotonic() - t0:.0f} s)")
                asyncio.run(warm_up(cluster, args))
                limit = check_memory(cluster, limit)
                rows += asyncio.run(measure(cluster, args))
    if args.json:
        print(json.dumps({"config": vars(args) | {"keep_logs": None}, "rows": rows}))
    else:
        report(rows, args)
    return 1 if any(r["errors"] for r in rows) else 0


def main(argv: list[str] | None = None) -> int:
    return entry(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())

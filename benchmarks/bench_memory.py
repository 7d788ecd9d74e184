"""Memory: a gateway's resident memory with thousands of open streams, and a worker's per slot.

Every worker's engine here is the LOAD SIMULATOR (`benchmarks/load_simulator.py`, a
stand-in OpenAI-compatible server that streams at a set rate using almost no CPU), so the
figures are Corral's processes alone, never a model's.

- gateway: one gateway and `--workers` workers of `--slots` slots whose simulator streams
  1 token a second, so streams stay open. The gateway's RSS idle (after a warm-up), then
  with as many streams open as there are slots (every one streaming), then with
  `--streams` open (the slots streaming, the rest queued: each holds its connection,
  its subscription and its task until a slot frees). Per stream: the growth over the streams.
- worker: one worker alone with 1, 2, 4 and 8 slots (each after serving two requests a
  slot, so every pool child has run a task): RSS of its main process and of each pool
  child, and the proportional set size (PSS: shared pages split between the processes
  sharing them) of the main process and pool together. Per slot: the PSS's growth per
  added slot.

Run:  python benchmarks/bench_memory.py [--streams 2000] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from bench_scale import ALIAS, PATH, config
from rig import Cluster, Sample, chat_body, entry, fetch, progress, running

MIB = 2**20
HOLD_TOKENS = 3000  # at 1 token a second: streams that outlast the measurement (and fit ctx_size)

EPILOG = """\
examples:
  python benchmarks/bench_memory.py                       2,000 streams; 1, 2, 4, 8 slots
  python benchmarks/bench_memory.py --streams 500 --slot-counts 1,4 --json
"""


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / MIB


def worker_memory(pid: int) -> dict[str, Any]:
    """RSS of a worker's main process and of each pool child, PSS of both together (MiB);
    its engine (another process group) left out."""
    main = psutil.Process(pid)
    group = os.getpgid(pid)
    pool = [p for p in main.children(recursive=True) if os.getpgid(p.pid) == group]
    infos = {p.pid: p.memory_full_info() for p in [main, *pool]}
    return {
        "main_rss": infos[pid].rss / MIB,
        "pool_rss": [infos[p.pid].rss / MIB for p in pool],
        "pool_uss": [infos[p.pid].uss / MIB for p in pool],
        "pss": sum(i.pss for i in infos.values()) / MIB,
    }


async def hold(port: int, n: int, tokens: int, active: int) -> list[asyncio.Task[Sample]]:
    """`n` streams opened and left running; returns once the gateway counts `active`."""
    tasks = [
        asyncio.create_task(fetch(port, PATH, chat_body(f"m{i}", tokens, True, ALIAS), 3600))
        for i in range(n)
    ]
    deadline = time.monotonic() + 120
    async with httpx.AsyncClient(timeout=10) as http:
        while time.monotonic() < deadline:
            await asyncio.sleep(1.0)
            ended = [t.result() for t in tasks if t.done()]
            if ended:
                raise RuntimeError(f"a stream ended early: {ended[0].error or ended[0].tokens}")
            got = (await http.get(f"http://127.0.0.1:{port}/health")).json()
            if int(got.get("active_streams", 0)) >= active:
                return tasks
    raise TimeoutError(f"the gateway holds {got.get('active_streams')} streams, wanted {active}")


async def gateway_run(cluster: Cluster, args: Any) -> dict[str, Any]:
    port = cluster.ports[0]
    gw = cluster.role_pids()["gateway-0"]
    slots = len(cluster.workers) * args.slots
    warm = await asyncio.gather(
        *(fetch(port, PATH, chat_body("w", 1, True, ALIAS)) for _ in range(8))
    )
    if any(s.error for s in warm):
        raise RuntimeError(f"warm-up failed: {next(s.error for s in warm if s.error)}")
    await asyncio.sleep(1.0)
    idle = rss_mib(gw)
    streaming = await hold(port, slots, HOLD_TOKENS, slots)
    at_slots = rss_mib(gw)
    rest = await hold(port, args.streams - slots, HOLD_TOKENS, args.streams)
    at_all = rss_mib(gw)
    progress(
        f"gateway RSS: idle {idle:.1f} MiB, {slots} streams {at_slots:.1f}, "
        f"{args.streams} {at_all:.1f}"
    )
    for task in [*streaming, *rest]:
        task.cancel()
    await asyncio.gather(*streaming, *rest, return_exceptions=True)
    return {
        "idle_mib": idle,
        "streaming": slots,
        "at_streaming_mib": at_slots,
        "open": args.streams,
        "at_open_mib": at_all,
        "kib_per_streaming": (at_slots - idle) * 1024 / slots,
        "kib_per_queued": (at_all - at_slots) * 1024 / max(args.streams - slots, 1),
        "kib_per_open": (at_all - idle) * 1024 / args.streams,
    }


async def worker_run(cluster: Cluster, slots: int) -> dict[str, Any]:
    port = cluster.ports[0]
    for _ in range(2):
        warm = await asyncio.gather(
            *(fetch(port, PATH, chat_body("w", 1, True, ALIAS)) for _ in range(slots))
        )
        if any(s.error for s in warm):
            raise RuntimeError(f"warm-up failed: {next(s.error for s in warm if s.error)}")
    await asyncio.sleep(1.0)
    return {"slots": slots, **worker_memory(cluster.role_pids()["worker-0"])}


def report(gw: dict[str, Any], workers: list[dict[str, Any]]) -> None:
    print(
        f"gateway RSS: idle {gw['idle_mib']:.1f} MiB; {gw['streaming']} streams (all streaming) "
        f"{gw['at_streaming_mib']:.1f} MiB; {gw['open']} open ({gw['streaming']} streaming, "
        f"the rest queued) {gw['at_open_mib']:.1f} MiB"
    )
    print(
        f"  per stream: {gw['kib_per_streaming']:.0f} KiB streaming, {gw['kib_per_queued']:.0f} "
        f"KiB queued, {gw['kib_per_open']:.0f} KiB on average over {gw['open']}"
    )
    print("\nworker (simulator engine left out), MiB:")
    print(
        f"{'slots':>5} | {'main RSS':>8} | {'pool RSS each':>13} | "
        f"{'pool USS each':>13} | {'PSS':>7}"
    )
    for w in workers:
        rss = sum(w["pool_rss"]) / max(len(w["pool_rss"]), 1)
        uss = sum(w["pool_uss"]) / max(len(w["pool_uss"]), 1)
        print(
            f"{w['slots']:>5} | {w['main_rss']:>8.1f} | {rss:>13.1f} | "
            f"{uss:>13.1f} | {w['pss']:>7.1f}"
        )
    if len(workers) >= 2:
        a, b = workers[0], workers[-1]
        slope = (b["pss"] - a["pss"]) / (b["slots"] - a["slots"])
        print(f"per slot (PSS growth from {a['slots']} to {b['slots']} slots): {slope:.1f} MiB")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench_memory.py",
        description=(__doc__ or "").split("\nRun:")[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = p.add_argument
    add("--streams", type=int, default=2000, help="streams held open at the gateway (2000)")
    add("--workers", type=int, default=8, help="workers behind the gateway (default: 8)")
    add("--slots", type=int, default=4, help="their slots (default: 4)")
    add("--slot-counts", default="1,2,4,8", help="slots of the lone worker (1,2,4,8)")
    add("--keep-logs", type=Path, default=None, metavar="DIR", help="keep the logs here")
    add("--json", action="store_true", help="print JSON on stdout")
    return p


def run(args: argparse.Namespace) -> int:
    args.tokens_per_s, args.burst = 1.0, args.streams  # the simulator's pace; the queue cap
    with tempfile.TemporaryDirectory(prefix="corral-memory-") as tmp:
        root = Path(tmp)
        logs = args.keep_logs or root
        logs.mkdir(parents=True, exist_ok=True)
        cfg = config(root, args)
        worker = ["--model", ALIAS, "--slots", str(args.slots)]
        with running(Cluster(logs, cfg, workers=[worker] * args.workers)) as cluster:
            gw = asyncio.run(gateway_run(cluster, args))
        workers = []
        for slots in (int(x) for x in args.slot_counts.split(",")):
            one = Cluster(logs, cfg, workers=[["--model", ALIAS, "--slots", str(slots)]])
            with running(one) as cluster:
                workers.append(asyncio.run(worker_run(cluster, slots)))
                progress(f"worker with {slots} slots: PSS {workers[-1]['pss']:.1f} MiB")
    if args.json:
        print(json.dumps({"gateway": gw, "workers": workers}))
    else:
        report(gw, workers)
    return 0


def main(argv: list[str] | None = None) -> int:
    return entry(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())

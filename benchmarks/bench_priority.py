"""Priority and cancellation under load: figures for the queueing issue.

1. Strict priority. One worker with one slot serves a generated model; N low requests
   (default 1,000) are queued behind it, then H high requests (default 20) arrive one at a
   time. Each high request's queue wait (started - enqueued, from `GET /v1/requests/{id}`)
   is compared with the mean service time of a request: the target is p99 <= 1.5x one
   service time, however many low requests wait. Requests are 128 tokens by default, the
   size `bench_stream.py` uses; the high ones are spaced by twice a measured service time
   (at least 0.15 s) so that they never queue behind each other.
2. Disconnect to free slot. A long streaming generation; the client drops the connection;
   the time until llama-server's `/slots` shows the slot idle (target <= 50 ms).

Run:  python benchmarks/bench_priority.py [--low 1000] [--high 20] [--tokens 128] [--threads N]
      [--cancels 10] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from common.net import free_port
from corral.procs import Child
from corral.redis_server import EmbeddedRedis
from corral.tinymodel import make_model

MODEL = "prio"
TARGET_WAIT_RATIO = 1.5
TARGET_FREE_MS = 50.0
MIN_SPACING_S = 0.15  # between two high requests


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


async def wait_ready(http: httpx.AsyncClient, base: str) -> None:
    for _ in range(600):
        try:
            if (await http.get(f"{base}/health")).json().get("ready_workers", 0) >= 1:
                return
        except (httpx.HTTPError, ValueError):
            pass
        await asyncio.sleep(0.1)
    raise TimeoutError("the cluster did not become ready")


async def record(http: httpx.AsyncClient, base: str, request_id: str) -> dict[str, Any]:
    data: dict[str, Any] = (await http.get(f"{base}/v1/requests/{request_id}")).json()
    return data


async def depth(http: httpx.AsyncClient, base: str, priority: str) -> int:
    stats = (await http.get(f"{base}/v1/queue/stats")).json()["models"][MODEL]
    return int(stats["priorities"][priority]["depth"])


async def priority_run(base: str, n_low: int, n_high: int, tokens: int) -> dict[str, float]:
    limits = httpx.Limits(max_connections=n_low + n_high + 20, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as http:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": tokens,
            "ignore_eos": True,
        }

        async def send(priority: str) -> str:
            r = await http.post(
                f"{base}/v1/chat/completions", json=body, headers={"X-Request-Priority": priority}
            )
            r.raise_for_status()
            return r.headers["x-request-id"]

        # One request alone sets the spacing of the high ones: two service times apart, a
        # high request never waits behind another, only behind the low one in the slot.
        probe = await record(http, base, await send("normal"))
        took = (probe.get("finished_at") or 0) - (probe.get("started_at") or 0)
        spacing = max(MIN_SPACING_S, 2 * took)

        # A long generation holds the only slot while the low requests queue up behind it.
        blocker_body = {**body, "max_tokens": 60000, "stream": True}
        blocker = await http.send(
            http.build_request("POST", f"{base}/v1/chat/completions", json=blocker_body),
            stream=True,
        )
        if blocker.status_code != 200:
            raise RuntimeError(f"the blocker was refused: {(await blocker.aread())[:300]!r}")
        lows = [asyncio.create_task(send("low")) for _ in range(n_low)]
        t0 = time.monotonic()
        while (queued := await depth(http, base, "low")) < n_low * 0.98:
            if time.monotonic() - t0 > 300:
                raise RuntimeError(f"only {queued} of {n_low} low requests queued in 300 s")
            failed = [t for t in lows if t.done() and t.exception()]
            if failed:
                first = failed[0].exception()
                raise RuntimeError(f"{len(failed)} low request(s) failed") from first
            await asyncio.sleep(0.2)
        await http.post(f"{base}/v1/requests/{blocker.headers['x-request-id']}/cancel")
        await blocker.aclose()
        progress(
            f"  {await depth(http, base, 'low')} low requests queued; "
            f"sending {n_high} high, {spacing * 1000:.0f} ms apart"
        )
        highs = []
        for _ in range(n_high):
            highs.append(asyncio.create_task(send("high")))
            await asyncio.sleep(spacing)
        high_ids = await asyncio.gather(*highs)
        low_done = [t.result() for t in lows if t.done() and not t.exception()]
        for t in lows:
            t.cancel()
        await asyncio.gather(*lows, return_exceptions=True)
        highs_rec = [await record(http, base, rid) for rid in high_ids]
        lows_rec = [await record(http, base, rid) for rid in low_done]
        while await depth(http, base, "low"):  # the abandoned ones are dropped unrun
            await asyncio.sleep(0.2)
    waits = [r["started_at"] - r["enqueued_at"] for r in highs_rec]
    services = [r["finished_at"] - r["started_at"] for r in highs_rec + lows_rec]
    ends = sorted(r["finished_at"] for r in highs_rec + lows_rec)
    # The slot's idle time before each high request started: from the end of the task
    # before it (the one it waited for) to its own start. A high request's wait is what
    # remained of that task plus this hand-off.
    handoffs = [
        r["started_at"] - max((e for e in ends if e <= r["started_at"]), default=0)
        for r in highs_rec
    ]
    service = statistics.mean(services)
    return {
        "low_queued": n_low,
        "high": n_high,
        "service_ms": service * 1000,
        "service_p50_ms": pct(services, 50) * 1000,
        "service_p99_ms": pct(services, 99) * 1000,
        "handoff_p50_ms": pct(handoffs, 50) * 1000,
        "handoff_p99_ms": pct(handoffs, 99) * 1000,
        "high_wait_p50_ms": pct(waits, 50) * 1000,
        "high_wait_p99_ms": pct(waits, 99) * 1000,
        "p99_over_service": pct(waits, 99) / service,
    }


def raw_stream(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    payload = json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "go"}],
            "max_tokens": 4000,
            "ignore_eos": True,
            "stream": True,
        }
    ).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: "
        f"application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    return sock


def cancel_run(base: str, upstream: str, n: int) -> dict[str, float]:
    times = []
    with httpx.Client(timeout=5) as http:
        for _ in range(n):
            sock = raw_stream(base)
            sock.recv(4096)  # the stream started: a slot is generating
            while not any(s.get("is_processing") for s in http.get(f"{upstream}/slots").json()):
                time.sleep(0.001)
            left = time.perf_counter()
            sock.close()
            while any(s.get("is_processing") for s in http.get(f"{upstream}/slots").json()):
                time.sleep(0.001)
            times.append((time.perf_counter() - left) * 1000)
            time.sleep(0.2)
    return {
        "n": n,
        "free_p50_ms": pct(times, 50),
        "free_p99_ms": pct(times, 99),
        "free_max_ms": max(times),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--low", type=int, default=1000, help="low requests queued (1000)")
    parser.add_argument("--high", type=int, default=20, help="high requests sent (20)")
    parser.add_argument("--cancels", type=int, default=10, help="disconnects measured (10)")
    parser.add_argument(
        "--tokens",
        type=int,
        default=128,
        help="tokens per low/high request (128, as bench_stream.py): the "
        "service time; the fixed hand-off between two tasks (~3 ms "
        "here) weighs more on short ones",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="llama-server threads (LLAMA_ARG_THREADS; default: a Corral "
        "CPU worker's: workers.engine.binary.cpu_threads)",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="corral-bench-prio-"))
    model = make_model(tmp / f"{MODEL}.gguf", ctx=65536)  # room for a long blocker
    env = {"CORRAL_LOG_LEVEL": "WARNING", "CORRAL_MAX_QUEUE_SIZE_PER_MODEL": str(args.low + 100)}
    if args.threads:
        env["LLAMA_ARG_THREADS"] = str(args.threads)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    children: list[Child] = []
    with EmbeddedRedis() as valkey:
        env["CORRAL_REDIS_URL"] = valkey.url
        exe = [sys.executable, "-m", "corral"]
        children.append(
            Child("gateway", [*exe, "gateway", "--port", str(port)], env, log=tmp / "gateway.log")
        )
        children.append(
            Child(
                "worker",
                [*exe, "worker", "--model", str(model), "--slots", "1", "--ctx-size", "65536"],
                env,
                log=tmp / "worker.log",
            )
        )
        try:
            for c in children:
                c.start()
            asyncio.run(_ready(base))
            upstream = _upstream(valkey.url)
            progress(f"logs in {tmp}")
            progress(
                f"priority: {args.low} low queued, then {args.high} high, {args.tokens} tokens each"
            )
            prio = asyncio.run(priority_run(base, args.low, args.high, args.tokens))
            progress(f"disconnect to free slot: {args.cancels} times")
            cancel = cancel_run(base, upstream, args.cancels)
        finally:
            for c in reversed(children):
                c.stop(grace=5)
    figures = {"priority": prio, "cancel": cancel}
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    print(f"strict priority ({prio['low_queued']:.0f} low queued, {prio['high']:.0f} high):")
    print(
        f"  mean service time      {prio['service_ms']:8.1f} ms "
        f"(p50 {prio['service_p50_ms']:.1f}, p99 {prio['service_p99_ms']:.1f})"
    )
    print(
        f"  slot hand-off p50      {prio['handoff_p50_ms']:8.1f} ms "
        f"(p99 {prio['handoff_p99_ms']:.1f}): a task's end to the high request's start"
    )
    print(f"  high queue wait p50    {prio['high_wait_p50_ms']:8.1f} ms")
    print(
        f"  high queue wait p99    {prio['high_wait_p99_ms']:8.1f} ms  = "
        f"{prio['p99_over_service']:.2f}x service (target <= {TARGET_WAIT_RATIO}x)"
    )
    print(f"disconnect -> slot free ({cancel['n']:.0f} runs):")
    print(
        f"  p50 {cancel['free_p50_ms']:.1f} ms, p99 {cancel['free_p99_ms']:.1f} ms "
        f"(target <= {TARGET_FREE_MS:.0f} ms)"
    )
    return 0


async def _ready(base: str) -> None:
    async with httpx.AsyncClient() as http:
        await wait_ready(http, base)


def _upstream(redis_url: str) -> str:
    import redis

    from common import redis_keys
    from common.registry import WorkerInfo

    r = redis.Redis.from_url(redis_url)
    try:
        for wid in r.smembers(redis_keys.WORKERS):
            raw = r.get(redis_keys.worker_key(redis_keys.text(wid)))
            if raw:
                info = WorkerInfo.model_validate_json(raw)
                if info.upstream:
                    return info.upstream
    finally:
        r.close()
    raise RuntimeError("no worker upstream found")


if __name__ == "__main__":
    raise SystemExit(main())

"""CPU time per request in each of Corral's processes, and Valkey commands per request.

Starts an embedded Valkey, one `corral gateway` and one `corral worker --model bench` (a
generated 64-dim 2-layer model on the real llama-server, 4 slots), then sends requests at a
fixed rate (open loop: each leaves on time whatever the replies), one kind per phase:

- idle: no requests; what each process spends on its own (heartbeats, events, polls);
- stream: streaming chat completions of `--tokens` tokens (`ignore_eos`, usage asked);
- whole: the same, not streaming;
- one: streaming, 1 token (the fixed cost of a request).

Per phase, from `/proc/<pid>/stat` (user + system time of every thread): the CPU each
process used, less what it uses idle over as long a time, divided by the requests; and
Valkey's `INFO commandstats` (reset at the start of each phase): commands per request, by
name, and the time Valkey spent in them. Per token: (stream - one) / (tokens - 1). What it
implies: requests/s and tokens/s one core of gateway (or worker) would sustain at these
costs, with nothing else on that core.

Run:  python benchmarks/bench_cost.py [--rate 8] [--requests 160] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from rig import (
    Cluster,
    CommandStats,
    CpuMeter,
    Sample,
    Used,
    chat_body,
    entry,
    fetch,
    open_loop,
    pct,
    progress,
    running,
)

from corral.tinymodel import make_model

ALIAS = "bench"
PATH = "/v1/chat/completions"
ROLES = ("gateway-0", "worker", "pool", "valkey", "engine")
CORRAL_ROLES = ("gateway-0", "worker", "pool", "valkey")
LABEL = {
    "gateway-0": "gateway",
    "worker": "worker main (Celery consumer)",
    "pool": "pool children (tasks)",
    "valkey": "Valkey",
    "engine": "llama-server",
}

EPILOG = """\
examples:
  python benchmarks/bench_cost.py                       8 requests/s, 160 a phase (~2 min)
  python benchmarks/bench_cost.py --rate 4 --requests 80 --json
  python benchmarks/bench_cost.py --threads 1           llama-server with one thread

CPU time is read from /proc at 100 ticks a second, per process; each phase lasts long
enough (tens of seconds) that the resolution is a fraction of a percent. The rate should
stay well below what the model serves (each request is then served alone or nearly), so
that the figures are the cost of a request, not of waiting.
"""


def config(root: Path, args: argparse.Namespace) -> Path:
    model = make_model(root / f"{ALIAS}.gguf", n_embd=args.n_embd, n_layer=args.n_layer)
    models = {ALIAS: {"model_path": str(model), "ctx_size": 512 * args.slots}}
    path = root / "corral.yaml"
    path.write_text(yaml.safe_dump({"models": models}))
    return path


class Phase:
    def __init__(self, name: str, tokens: int, stream: bool) -> None:
        self.name, self.tokens, self.stream = name, tokens, stream


async def run_phase(
    cluster: Cluster, meter: CpuMeter, stats: CommandStats, phase: Phase | None, args: Any
) -> dict[str, Any]:
    """One phase: (requests sent at `args.rate`, or none for idle) → CPU and commands."""
    port = cluster.ports[0]
    rng = random.Random(args.seed)
    nonce = f"{time.time_ns():x}"

    async def send(i: int) -> Sample:
        assert phase is not None
        words = " ".join(rng.choices(("amber", "river", "stone", "cloud", "ember"), k=10))
        body = chat_body(f"{i} {nonce} {words}", phase.tokens, phase.stream, ALIAS)
        return await fetch(port, PATH, body)

    stats.reset()
    before = meter.snapshot()
    if phase is None:
        await asyncio.sleep(args.requests / args.rate)
        samples: list[Sample] = []
    else:
        samples = await open_loop(send, args.rate, args.requests)
        await asyncio.sleep(0.5)  # acks, events and records written after the reply
    used = CpuMeter.used(before, meter.snapshot())
    commands = stats.read()
    errors = [s.error for s in samples if s.error]
    short = [s for s in samples if not s.error and phase and s.tokens != phase.tokens]
    return {
        "phase": phase.name if phase else "idle",
        "requests": len(samples),
        "errors": len(errors) + len(short),
        "first_error": errors[0] if errors else (f"{short[0].tokens} tokens" if short else None),
        "wall_s": used.wall,
        "cpu_s": used.seconds,
        "commands": commands,
        "latency_p50_ms": pct([((s.done or 0) - s.sent) * 1000 for s in samples], 50),
        "ttft_p50_ms": pct([s.ttft * 1000 for s in samples if s.ttft is not None], 50),
    }


def per_request(result: dict[str, Any], idle: dict[str, Any]) -> dict[str, float]:
    """CPU ms per request per role, less the idle rate over the phase's wall time."""
    n = max(result["requests"], 1)
    rate = {k: v / idle["wall_s"] for k, v in idle["cpu_s"].items()}
    return {
        role: max(0.0, result["cpu_s"].get(role, 0.0) - rate.get(role, 0.0) * result["wall_s"])
        / n
        * 1000
        for role in ROLES
    }


def commands_per_request(result: dict[str, Any], idle: dict[str, Any]) -> dict[str, float]:
    """Valkey calls per request by command, less the idle phase's rate."""
    n = max(result["requests"], 1)
    rate = {k: c / idle["wall_s"] for k, (c, _) in idle["commands"].items()}
    out = {}
    for name, (calls, _) in result["commands"].items():
        net = (calls - rate.get(name, 0.0) * result["wall_s"]) / n
        if net > 0.05:
            out[name] = net
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def summarize(results: dict[str, dict[str, Any]], tokens: int) -> dict[str, Any]:
    idle = results["idle"]
    phases = [p for p in results if p != "idle"]
    cost = {p: per_request(results[p], idle) for p in phases}
    cmds = {p: commands_per_request(results[p], idle) for p in phases}
    per_token = {
        role: (cost["stream"][role] - cost["one"][role]) / max(tokens - 1, 1) * 1000
        for role in ROLES
    }
    valkey_us = {
        p: sum(us for _, us in results[p]["commands"].values()) / max(results[p]["requests"], 1)
        for p in phases
    }
    stream_cmds = sum(cmds["stream"].values())
    one_cmds = sum(cmds["one"].values())
    gw_one, gw_stream = cost["one"]["gateway-0"], cost["stream"]["gateway-0"]
    wk_stream = cost["stream"]["worker"] + cost["stream"]["pool"]
    implied = {
        "gateway_requests_per_core_s": 1000 / gw_one if gw_one else None,
        "gateway_streams_per_core_s": 1000 / gw_stream if gw_stream else None,
        "gateway_tokens_per_core_s": tokens * 1000 / gw_stream if gw_stream else None,
        "worker_tokens_per_core_s": tokens * 1000 / wk_stream if wk_stream else None,
        "valkey_requests_per_core_s": (
            1000 / cost["stream"]["valkey"] if cost["stream"]["valkey"] else None
        ),
    }
    return {
        "cpu_ms_per_request": cost,
        "cpu_us_per_token": per_token,
        "idle_cores": {k: v / idle["wall_s"] for k, v in idle["cpu_s"].items()},
        "commands_per_request": cmds,
        "commands_per_token": (stream_cmds - one_cmds) / max(tokens - 1, 1),
        "valkey_command_us_per_request": valkey_us,
        "implied": implied,
    }


def report(s: dict[str, Any], results: dict[str, dict[str, Any]], args: Any) -> None:
    cost = s["cpu_ms_per_request"]
    heads = (f"stream {args.tokens}", f"whole {args.tokens}", "1 token", "per token")
    print(f"CPU per request, ms (net of idle), at {args.rate:g} requests/s")
    print(f"{'':32}" + "".join(f"{h:>12}" for h in heads))
    for role in ROLES:
        row = [cost[p][role] for p in ("stream", "whole", "one")]
        print(
            f"{LABEL[role]:32}"
            + "".join(f"{v:>12.2f}" for v in row)
            + f"{s['cpu_us_per_token'][role]:>9.1f} us"
        )
    total = [sum(cost[p][r] for r in CORRAL_ROLES) for p in ("stream", "whole", "one")]
    tok = sum(s["cpu_us_per_token"][r] for r in CORRAL_ROLES)
    print(f"{'Corral (all but llama-server)':32}" + "".join(f"{v:>12.2f}" for v in total), end="")
    print(f"{tok:>9.1f} us")
    ncmd = [sum(s["commands_per_request"][p].values()) for p in ("stream", "whole", "one")]
    print(f"{'Valkey commands':32}" + "".join(f"{v:>12.1f}" for v in ncmd), end="")
    print(f"{s['commands_per_token']:>12.2f}")
    us = [s["valkey_command_us_per_request"][p] for p in ("stream", "whole", "one")]
    print(f"{'Valkey time in commands, us':32}" + "".join(f"{v:>12.0f}" for v in us))
    print("\nValkey commands per request (stream):")
    print("  " + ", ".join(f"{k} {v:.1f}" for k, v in s["commands_per_request"]["stream"].items()))
    print("Valkey commands per request (1 token):")
    print("  " + ", ".join(f"{k} {v:.1f}" for k, v in s["commands_per_request"]["one"].items()))
    idle = ", ".join(f"{LABEL.get(k, k)} {v:.3f}" for k, v in s["idle_cores"].items())
    print(f"\nidle (cores): {idle}")
    lat = ", ".join(
        f"{p} {results[p]['latency_p50_ms']:.1f} ms" for p in ("stream", "whole", "one")
    )
    print(f"latency p50: {lat}")
    imp = {k: "n/a" if v is None else f"{v:.0f}" for k, v in s["implied"].items()}
    print("\nWhat it implies (one core each, nothing else on it; n/a: too small to measure):")
    print(f"  a gateway: ~{imp['gateway_requests_per_core_s']} requests/s of 1 token; ", end="")
    print(
        f"~{imp['gateway_streams_per_core_s']} streams/s of {args.tokens} tokens "
        f"= ~{imp['gateway_tokens_per_core_s']} tokens/s"
    )
    print(f"  a worker (main + pool): ~{imp['worker_tokens_per_core_s']} tokens/s streamed")
    print(f"  Valkey: ~{imp['valkey_requests_per_core_s']} streams/s of {args.tokens} tokens")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench_cost.py",
        description=(__doc__ or "").split("\nRun:")[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = p.add_argument
    add("--rate", type=float, default=8.0, help="requests per second (default: 8)")
    add("--requests", type=int, default=160, help="requests per phase (default: 160)")
    add("--tokens", type=int, default=128, help="tokens per request of stream/whole (128)")
    add("--slots", type=int, default=4, help="worker slots (default: 4)")
    add("--threads", type=int, default=None, help="llama-server threads (LLAMA_ARG_THREADS)")
    add("--n-embd", type=int, default=64, help="generated model width (default: 64)")
    add("--n-layer", type=int, default=2, help="generated model layers (default: 2)")
    add("--seed", type=int, default=0, help="seed of the prompt words (default: 0)")
    add("--keep-logs", type=Path, default=None, metavar="DIR", help="keep the logs here")
    add("--json", action="store_true", help="print JSON on stdout")
    return p


async def measure(cluster: Cluster, args: Any) -> dict[str, dict[str, Any]]:
    meter = CpuMeter(cluster)
    stats = CommandStats(cluster.valkey.url)
    warm = Phase("warm-up", 16, True)
    few = argparse.Namespace(**{**vars(args), "requests": 4 * args.slots})
    warmed = await run_phase(cluster, meter, stats, warm, few)
    if warmed["errors"]:
        raise RuntimeError(f"warm-up failed: {warmed['first_error']}")
    meter.refresh()  # the pool children, forked by now
    progress(f"pids: { {r: meter.pids(r) for r in ROLES} }")
    phases = [
        None,
        Phase("stream", args.tokens, True),
        Phase("whole", args.tokens, False),
        Phase("one", 1, True),
    ]
    results: dict[str, dict[str, Any]] = {}
    for phase in phases:
        res = await run_phase(cluster, meter, stats, phase, args)
        results[res["phase"]] = res
        cores = Used(res["wall_s"], res["cpu_s"]).cores()
        progress(
            f"[{res['phase']}] {res['requests']} requests in {res['wall_s']:.1f} s, "
            f"{res['errors']} errors; cores: " + ", ".join(f"{k} {v:.2f}" for k, v in cores.items())
        )
    return results


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="corral-cost-") as tmp:
        root = Path(tmp)
        logs = args.keep_logs or root
        logs.mkdir(parents=True, exist_ok=True)
        env = {"LLAMA_ARG_THREADS": str(args.threads)} if args.threads else {}
        worker = ["--model", ALIAS, "--slots", str(args.slots)]
        cluster = Cluster(logs, config(root, args), gateways=1, workers=[worker], env=env)
        with running(cluster, timeout=180):
            results = asyncio.run(measure(cluster, args))
    s = summarize(results, args.tokens)
    if args.json:
        print(json.dumps({"config": vars(args) | {"keep_logs": None}, **s, "raw": results}))
    else:
        report(s, results, args)
    return 1 if any(r["errors"] for r in results.values()) else 0


def main(argv: list[str] | None = None) -> int:
    return entry(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())

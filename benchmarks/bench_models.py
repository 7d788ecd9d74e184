"""Models on demand on one host: `corral up` with four generated models of different sizes
on a memory budget that holds two, against llama-server's own start time for each model.

1. llama-server alone: the median time from spawn to `/health` 200 for each model
   (`--threads` as Corral's workers give it), the yardstick of every cold figure below.
2. The cold path, one probe at a time:
   - the first request after start and the next one (a preloaded model): target <= 50 ms
     apart;
   - a cold request on free memory: its load time (the worker's loading -> ready events)
     against llama-server's start (target <= start + 0.3 s), and its whole time to first
     token;
   - a swap (the budget full: one idle model out, the newcomer in) against unload + load
     (target <= + 0.3 s);
   - 20 concurrent first requests for a cold model against one (target: no slower).
3. A mix: `--clients` clients for `--seconds`, each request for a model drawn from a Zipf
   distribution (the big ones rarer), 30 % high and 70 % low priority, streaming 16
   tokens; loads, evictions, and time to first token p50/p99 for warm and cold requests
   (cold: the model was not ready when the request was sent), each cold one also as a
   ratio to its model's llama-server start.

Run:  python benchmarks/bench_models.py [--seconds 120] [--clients 4] [--seed 0] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import redis
import yaml

from common import redis_keys
from common.estimate import estimate_file
from common.net import free_port
from common.registry import ModelEvent
from corral.procs import Child
from corral.tinymodel import make_model
from workers.engine.binary import child_env, cpu_threads, resolve_binary

# alias -> tiny model dimensions: four sizes, the last the largest
SIZES = {
    "m64": {"n_embd": 64, "n_layer": 2, "n_ff": 128},
    "m128": {"n_embd": 128, "n_layer": 2, "n_ff": 256},
    "m256": {"n_embd": 256, "n_layer": 4, "n_ff": 512},
    "m384": {"n_embd": 384, "n_layer": 6, "n_ff": 1024},
}
CTX = 2048
SLOTS = 2
ZIPF_S = 1.2


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms"


# -- 1. llama-server alone --------------------------------------------------------------------
def llama_start_s(model: Path, runs: int = 3) -> float:
    binary = resolve_binary()
    times = []
    for _ in range(runs):
        port = free_port()
        argv = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port)]
        argv += ["--ctx-size", str(CTX), "--parallel", str(SLOTS), "--threads", str(cpu_threads())]
        started = time.monotonic()
        proc = subprocess.Popen(
            argv, env=child_env(binary, None), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            with httpx.Client(timeout=1) as http:
                while True:
                    try:
                        if http.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    time.sleep(0.005)
            times.append(time.monotonic() - started)
        finally:
            proc.terminate()
            proc.wait()
    return statistics.median(times)


# -- the cluster ------------------------------------------------------------------------------
class Up:
    def __init__(self, root: Path, models: dict[str, Path], budget_mb: int) -> None:
        config: dict[str, Any] = {
            "models_dir": str(root / "models"),
            "min_residency": 0,
            "max_swap_wait": 0,
            "models": {a: {"ctx_size": CTX, "parallel": SLOTS} for a in models},
        }
        config["models"]["m64"]["preload"] = True
        (root / "corral.yaml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        argv = [
            sys.executable,
            "-m",
            "corral",
            "up",
            "--config",
            str(root / "corral.yaml"),
            "--port",
            str(self.port),
            "--data-dir",
            str(root / "data"),
            "--ram-budget",
            f"{budget_mb}MiB",
        ]
        self.child = Child("corral up", argv, log=root / "up.log")
        self.log = root / "up.log"
        self.data = root / "data"

    def start(self) -> float:
        started = time.monotonic()
        self.child.start()
        while "Corral is up" not in self.log.read_text(errors="replace"):
            if self.child.poll() is not None:
                raise RuntimeError(self.log.read_text())
            time.sleep(0.05)
        return time.monotonic() - started

    @property
    def redis_url(self) -> str:
        run = yaml.safe_load((self.data / "run" / "corral-up.yaml").read_text())
        return str(run["redis_url"])

    def stop(self) -> None:
        self.child.stop(grace=30, sig=signal.SIGINT)


class Events:
    """Every ModelEvent (loading, ready, unloading, off...) while it listens."""

    def __init__(self, url: str) -> None:
        self.items: list[ModelEvent] = []
        self._client = redis.Redis.from_url(url)
        self._sub = self._client.pubsub()
        self._sub.subscribe(redis_keys.EVENTS)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            msg = self._sub.get_message(timeout=0.1)
            if msg and msg["type"] == "message":
                self.items.append(ModelEvent.model_validate_json(msg["data"]))

    def load_s(self, alias: str, since: float) -> float | None:
        """The last load of `alias` after `since` (epoch): loading -> ready."""
        mine = [e for e in self.items if e.model == alias and e.at >= since]
        start = next((e.at for e in mine if e.state.value == "loading"), None)
        ready = next((e.at for e in reversed(mine) if e.state.value == "ready"), None)
        return ready - start if start is not None and ready is not None else None

    def unload_s(self, since: float) -> float | None:
        mine = [e for e in self.items if e.at >= since]
        start = next((e.at for e in mine if e.state.value == "unloading"), None)
        off = next((e.at for e in mine if e.state.value == "off" and start and e.at >= start), None)
        return off - start if start is not None and off is not None else None

    def count(self, state: str) -> int:
        return sum(e.state.value == state for e in self.items)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sub.close()
        self._client.close()


async def first_token(http: httpx.AsyncClient, base: str, alias: str, priority: str) -> float:
    body = {
        "model": alias,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 16,
        "stream": True,
    }
    started = time.monotonic()
    async with http.stream(
        "POST", f"{base}/v1/chat/completions", json=body, headers={"X-Request-Priority": priority}
    ) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"{alias}: HTTP {resp.status_code}: {await resp.aread()!r}")
        ttft = None
        async for line in resp.aiter_lines():
            if ttft is None and line.startswith("data: {"):
                ttft = time.monotonic() - started
        assert ttft is not None
        return ttft


async def status(http: httpx.AsyncClient, base: str) -> dict[str, Any]:
    models: dict[str, Any] = (await http.get(f"{base}/v1/models/status")).json()["models"]
    return models


async def wait_settled(http: httpx.AsyncClient, base: str) -> None:
    """Until no model is loading or unloading."""
    for _ in range(600):
        states = {m["status"] for m in (await status(http, base)).values()}
        if not states & {"loading", "unloading"}:
            return
        await asyncio.sleep(0.1)


# -- 2. the cold path --------------------------------------------------------------------------
async def cold_path(up: Up, events: Events, starts: dict[str, float]) -> dict[str, Any]:
    """The probes, in an order that fills the budget (the two largest models) on purpose."""
    base = up.base
    out: dict[str, Any] = {}
    async with httpx.AsyncClient(timeout=120) as http:
        out["first_after_start_s"] = await first_token(http, base, "m64", "high")
        out["next_s"] = await first_token(http, base, "m64", "high")
        since = time.time()
        out["cold_free_ttft_s"] = await first_token(http, base, "m128", "high")
        out["cold_free_load_s"] = events.load_s("m128", since)
        out["cold_free_llama_s"] = starts["m128"]
        await wait_settled(http, base)
        since = time.time()  # m64 + m128 + m384 is over the budget: the LRU (m64) goes
        out["swap_ttft_s"] = await first_token(http, base, "m384", "high")
        out["swap_load_s"] = events.load_s("m384", since)
        out["swap_unload_s"] = events.unload_s(since)
        out["swap_llama_s"] = starts["m384"]
        for n in (20, 1):
            await http.post(f"{base}/v1/models/eject", json={"model": "m384"})
            await wait_settled(http, base)
            since = time.time()
            ttfts = await asyncio.gather(
                *(first_token(http, base, "m384", "high") for _ in range(n))
            )
            out[f"cold_{n}_first_ttft_s"] = min(ttfts)
            out[f"cold_{n}_load_s"] = events.load_s("m384", since)
    return out


# -- 3. the mix --------------------------------------------------------------------------------
async def mix(
    up: Up, seconds: float, clients: int, seed: int, starts: dict[str, float]
) -> dict[str, Any]:
    rng = random.Random(seed)
    aliases = list(SIZES)
    weights = [1 / (i + 1) ** ZIPF_S for i in range(len(aliases))]
    warm: list[float] = []
    cold: list[tuple[str, float]] = []
    errors = 0
    deadline = time.monotonic() + seconds

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors
        while time.monotonic() < deadline:
            alias = rng.choices(aliases, weights)[0]
            priority = "high" if rng.random() < 0.3 else "low"
            was_ready = (await status(http, up.base))[alias]["status"] == "ready"
            try:
                ttft = await first_token(http, up.base, alias, priority)
            except (RuntimeError, httpx.HTTPError):
                errors += 1
                continue
            (warm.append(ttft) if was_ready else cold.append((alias, ttft)))

    async with httpx.AsyncClient(timeout=300) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    cold_ttft = [t for _, t in cold]
    ratios = [t / starts[a] for a, t in cold]
    return {
        "requests": len(warm) + len(cold),
        "errors": errors,
        "warm": len(warm),
        "cold": len(cold),
        "warm_ttft_p50_s": pct(warm, 50),
        "warm_ttft_p99_s": pct(warm, 99),
        "cold_ttft_p50_s": pct(cold_ttft, 50),
        "cold_ttft_p99_s": pct(cold_ttft, 99),
        "cold_over_llama_start_p50": pct(ratios, 50),
        "cold_over_llama_start_p99": pct(ratios, 99),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-models-") as tmp:
        root = Path(tmp)
        models = {
            a: make_model(
                root / "models" / f"{a}.gguf",
                n_embd=d["n_embd"],
                n_layer=d["n_layer"],
                n_ff=d["n_ff"],
            )
            for a, d in SIZES.items()
        }
        needs = {a: estimate_file(p, ctx_size=CTX, slots=SLOTS).total_mb for a, p in models.items()}
        budget = needs["m384"] + needs["m128"] + 4  # m384 fits with m64 or m128, not both
        progress(f"models (estimated MiB): {needs}; budget {budget} MiB")
        starts = {a: llama_start_s(p) for a, p in models.items()}
        progress(
            "llama-server alone, spawn to /health: "
            + ", ".join(f"{a} {s * 1000:.0f} ms" for a, s in starts.items())
        )
        up = Up(root, models, budget)
        up_s = up.start()
        events = Events(up.redis_url)
        try:
            progress(f"corral up ready in {up_s:.1f} s; cold-path probes...")
            cold = asyncio.run(cold_path(up, events, starts))
            progress(f"mix for {args.seconds:.0f} s with {args.clients} clients...")
            mixed = asyncio.run(mix(up, args.seconds, args.clients, args.seed, starts))
            mixed["loads"] = events.count("ready")
            mixed["evictions"] = events.count("unloading")
        finally:
            events.close()
            up.stop()
    report(starts, cold, mixed)
    if args.json:
        print(json.dumps({"llama_start_s": starts, "cold_path": cold, "mix": mixed}, indent=2))
    return 0


def report(starts: dict[str, float], cold: dict[str, Any], mixed: dict[str, Any]) -> None:
    print(
        "\nllama-server alone, spawn to /health: "
        + ", ".join(f"{a} {ms(s)}" for a, s in starts.items())
    )
    print("\ncold path")
    print(
        f"  first request after start   {ms(cold['first_after_start_s'])}  "
        f"(next {ms(cold['next_s'])}; target <= next + 50 ms)"
    )
    print(
        f"  cold on free memory: load   {ms(cold['cold_free_load_s'])}  (llama-server "
        f"{ms(cold['cold_free_llama_s'])}; target <= + 300 ms), TTFT "
        f"{ms(cold['cold_free_ttft_s'])}"
    )
    unload, load = cold["swap_unload_s"], cold["swap_load_s"]
    print(
        f"  swap: unload {ms(unload)} + load {ms(load)}  (llama-server "
        f"{ms(cold['swap_llama_s'])}), TTFT {ms(cold['swap_ttft_s'])}"
    )
    print(
        f"  20 concurrent cold requests: load {ms(cold['cold_20_load_s'])}, first token "
        f"{ms(cold['cold_20_first_ttft_s'])}  (one alone: load {ms(cold['cold_1_load_s'])}, "
        f"first token {ms(cold['cold_1_first_ttft_s'])}; target: no slower)"
    )
    print(
        f"\nmix: {mixed['requests']} requests ({mixed['errors']} errors), "
        f"{mixed['loads']} loads, {mixed['evictions']} evictions"
    )
    print(
        f"  warm TTFT p50 {ms(mixed['warm_ttft_p50_s'])} p99 {ms(mixed['warm_ttft_p99_s'])}"
        f"  ({mixed['warm']} requests)"
    )
    print(
        f"  cold TTFT p50 {ms(mixed['cold_ttft_p50_s'])} p99 {ms(mixed['cold_ttft_p99_s'])}"
        f"  ({mixed['cold']} requests)"
    )
    r50, r99 = mixed["cold_over_llama_start_p50"], mixed["cold_over_llama_start_p99"]
    if r50 is not None:
        print(f"  cold TTFT / llama-server start: p50 {r50:.1f}x, p99 {r99:.1f}x")


if __name__ == "__main__":
    sys.exit(main())

"""The response cache: what a hit costs against a warm worker's time to first token.

One gateway and one worker (a generated 64-dim model, cache on, 2 slots) on an embedded
Valkey, one client, one request at a time (keep-alive). Per round, with a prompt of its own:

- miss:      streaming, temperature 0, a prompt never seen: the worker generates it (the
             cache is looked up once, and filled once the stream ends);
- hit:       the same request again: replayed from the cache as SSE;
- hit JSON:  the same, not streaming: the kept reply as one JSON body;
- no lookup: streaming with `Cache-Control: no-store` and a prompt of its own, as long:
             the worker generates it and the cache is not touched (what a model whose
             cache is off costs), so miss minus this is the lookup's cost. Miss and no
             lookup go in either order, alternately.

TTFT = request sent -> first non-empty `delta.content`; total = -> `data: [DONE]` (or the
JSON body). Printed: p50 / p99 of each, and the hit's TTFT as a fraction of the warm
worker's. Compare within a run: this machine's speed moves between runs.

Run:  python benchmarks/bench_cache.py [--rounds 200] [--max-tokens 32] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

from common.net import free_port
from corral.procs import Child
from corral.redis_server import EmbeddedRedis
from corral.tinymodel import make_model

MODEL = "bench"
KINDS = ("miss", "hit", "hit_json", "no_lookup")


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextmanager
def cluster(root: Path, slots: int) -> Iterator[str]:
    """Valkey, `corral gateway` and `corral worker --model bench`; yields the base URL."""
    config = {
        "models": {
            MODEL: {
                "model_path": str(make_model(root / "bench.gguf")),
                "ctx_size": 4096,
                "parallel": slots,
                "cache": {"ttl": 3600, "max_entries": 100_000},
            }
        }
    }
    (root / "corral.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    with EmbeddedRedis() as valkey:
        env = {
            "CORRAL_REDIS_URL": valkey.url,
            "CORRAL_CONFIG": str(root / "corral.yaml"),
            "CORRAL_LOG_LEVEL": "WARNING",
        }
        corral = [sys.executable, "-m", "corral"]
        children = [
            Child("gateway", [*corral, "gateway", "--port", str(port)], env, log=root / "gw.log"),
            Child("worker", [*corral, "worker", "--model", MODEL], env, log=root / "worker.log"),
        ]
        try:
            for child in children:
                child.start()
            base = f"http://127.0.0.1:{port}"
            wait_ready(base, root)
            yield base
        finally:
            for child in reversed(children):
                child.stop(grace=10)


def wait_ready(base: str, root: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=1).json().get("ready_workers", 0) >= 1:
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in root.glob("*.log"))
    raise RuntimeError(f"the cluster did not come up in {timeout:.0f} s:\n{logs}")


def one(
    http: httpx.Client, base: str, prompt: str, max_tokens: int, *, stream: bool, store: bool
) -> tuple[float | None, float, str]:
    """(TTFT or None, total, x-corral-cache) of one request, in seconds."""
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        "ignore_eos": True,
    }
    headers = {} if store else {"Cache-Control": "no-store"}
    sent = time.perf_counter()
    first = None
    with http.stream("POST", f"{base}/v1/chat/completions", json=body, headers=headers) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {resp.read()!r}")
        if not stream:
            resp.read()
            return None, time.perf_counter() - sent, resp.headers.get("x-corral-cache", "")
        for line in resp.iter_lines():
            if first is None and line.startswith("data: {") and _content(line[6:]):
                first = time.perf_counter() - sent
    return first, time.perf_counter() - sent, resp.headers.get("x-corral-cache", "")


def _content(data: str) -> bool:
    choices = json.loads(data).get("choices") or [{}]
    return bool((choices[0].get("delta") or {}).get("content"))


def measure(base: str, rounds: int, max_tokens: int) -> dict[str, dict[str, list[float]]]:
    out: dict[str, dict[str, list[float]]] = {k: {"ttft": [], "total": []} for k in KINDS}
    nonce = uuid.uuid4().hex[:8]
    with httpx.Client(timeout=60) as http:
        for i in range(8):  # warm-up: the worker, the connection, the cache path
            one(http, base, f"warm {nonce} {i}", max_tokens, stream=True, store=True)
            one(http, base, f"warm {nonce} {i}", max_tokens, stream=True, store=True)
        for i in range(rounds):
            prompt = f"round {i:05d} of run {nonce}: tell me a story"
            other = f"story {i:05d} of run {nonce}: tell me a round"  # as long, no shared head
            if i % 2:  # the two worker-bound requests in either order, alternately
                miss = one(http, base, prompt, max_tokens, stream=True, store=True)
                plain = one(http, base, other, max_tokens, stream=True, store=False)
            else:
                plain = one(http, base, other, max_tokens, stream=True, store=False)
                miss = one(http, base, prompt, max_tokens, stream=True, store=True)
            time.sleep(0.02)  # the fill is in the background, after the reply
            hit = one(http, base, prompt, max_tokens, stream=True, store=True)
            whole = one(http, base, prompt, max_tokens, stream=False, store=True)
            for kind, (ttft, total, said) in zip(KINDS, (miss, hit, whole, plain), strict=True):
                want = "hit" if kind.startswith("hit") else "miss"
                if said != want:
                    raise RuntimeError(f"round {i}: {kind} was a {said or 'no-header'}")
                if ttft is not None:
                    out[kind]["ttft"].append(ttft)
                out[kind]["total"].append(total)
            if (i + 1) % 50 == 0:
                progress(f"  {i + 1}/{rounds} rounds")
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summary(found: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind, series in found.items():
        out[kind] = {
            f"{what}_{q}_ms": round(pct(values, q) * 1000, 2)
            for what, values in series.items()
            if values
            for q in (50, 99)
        }
    out["hit_ttft_over_warm_ttft_p50"] = round(
        statistics.median(found["hit"]["ttft"]) / statistics.median(found["miss"]["ttft"]), 3
    )
    out["lookup_ms_p50"] = round(
        (statistics.median(found["miss"]["ttft"]) - statistics.median(found["no_lookup"]["ttft"]))
        * 1000,
        2,
    )
    return out


def report(s: dict[str, Any], rounds: int, max_tokens: int) -> None:
    print(f"\n{rounds} rounds, {max_tokens} tokens a reply, one request at a time")
    print("                       TTFT p50 / p99 ms    total p50 / p99 ms")
    names = {
        "miss": "miss (warm worker)",
        "hit": "hit, SSE",
        "hit_json": "hit, JSON",
        "no_lookup": "no lookup (no-store)",
    }
    for kind, name in names.items():
        row = s[kind]
        ttft = (
            f"{row['ttft_50_ms']:8.2f} / {row['ttft_99_ms']:7.2f}"
            if "ttft_50_ms" in row
            else " " * 18
        )
        print(f"  {name:<20} {ttft}   {row['total_50_ms']:8.2f} / {row['total_99_ms']:7.2f}")
    print(
        f"hit TTFT = {s['hit_ttft_over_warm_ttft_p50']:.2f} x a warm worker's (p50); "
        f"the lookup on a miss: {s['lookup_ms_p50']:+.2f} ms (p50 miss - p50 no lookup)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=200, help="prompts measured (default 200)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens a reply (default 32)")
    parser.add_argument("--slots", type=int, default=2, help="the worker's slots (default 2)")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        progress("starting Valkey, a gateway and a worker...")
        with cluster(Path(tmp), args.slots) as base:
            progress(f"measuring {args.rounds} rounds...")
            found = measure(base, args.rounds, args.max_tokens)
    s = summary(found)
    report(s, args.rounds, args.max_tokens)
    if args.json:
        print(json.dumps(s, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Prefix affinity: conversations' later turns against their replica's prompt cache.

Two replicas of one generated model (512-dim, 8 layers; 4 slots each), in three setups
measured in one run, each from a cold start:

- affinity:     Corral (embedded Valkey, a gateway, two workers), affinity on;
- shared queue: the same with `affinity: false`: whichever replica is free first;
- round-robin:  the two llama-servers alone, with the same flags and threads, each request
                sent to the next one in turn by the client itself (the way a proxy's
                simple-shuffle router spreads load, without the proxy's own cost).

Two workloads per setup:

- conversations: 8 conversations, each with its own system prompt (~1,500 tokens), 5
  turns each, each conversation sending its next turn when its reply is in, all 8 at
  once (interleaved); replies of 32 tokens. TTFT (request sent -> first content) p50 /
  p99 per turn number, the whole workload's time, and the share of prompt tokens the
  engines took from their prompt cache (`usage.prompt_tokens_details.cached_tokens`).
- no prefix: 48 requests with prompts that share nothing, 8 at a time: completion tokens
  a second (affinity must cost nothing where there is nothing to share).

Each llama-server keeps `--cache-ram` (host memory prompt cache, 8 GiB by default) unless
`--engine-flags` says otherwise: with it, a replica that has seen a conversation once
keeps most of its prefix even when other turns went elsewhere. `--engine-flags
"--cache-ram 0"` shows a server with only its slots' caches (a GPU box whose host memory
is spoken for, or an older llama.cpp).

Run:  python benchmarks/bench_affinity.py [--turns 5] [--conversations 8] [--json]
                                          [--engine-flags "--cache-ram 0"]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from common.net import free_port
from corral.procs import Child
from corral.redis_server import EmbeddedRedis
from corral.tinymodel import _WORDS, make_model
from workers.engine.binary import resolve_binary

MODEL = "bench-aff"
SLOTS = 4  # per replica (`--slots`)
CTX_PER_SLOT = 4096
REPLY_TOKENS = 32
THREADS = "1"  # per llama-server: two replicas share this machine's two cores
SETUPS = ("affinity", "shared", "round_robin")


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Turn:
    turn: int
    ttft: float
    prompt_tokens: int
    cached_tokens: int


@dataclass
class Result:
    turns: list[Turn] = field(default_factory=list)
    conversations_s: float = 0.0
    no_prefix_tok_s: float = 0.0


# -- the setups ------------------------------------------------------------------------


def engine_env() -> dict[str, str]:
    return {"LLAMA_ARG_THREADS": THREADS}


@contextmanager
def corral(root: Path, model: Path, affinity: bool, flags: list[str]) -> Iterator[Sender]:
    config = {
        "models": {
            MODEL: {
                "model_path": str(model),
                "ctx_size": SLOTS * CTX_PER_SLOT,
                "parallel": SLOTS,
                "affinity": affinity,
                "flags": flags,
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
            **engine_env(),
        }
        argv = [sys.executable, "-m", "corral"]
        children = [
            Child("gateway", [*argv, "gateway", "--port", str(port)], env, log=root / "gw.log")
        ]
        for i in range(2):
            worker = [*argv, "worker", "--model", MODEL]
            children.append(Child(f"worker{i}", worker, env, log=root / f"w{i}.log"))
        try:
            for child in children:
                child.start()
            base = f"http://127.0.0.1:{port}"
            wait_until(lambda: _ready_workers(base) >= 2, root)
            time.sleep(2.5)  # the gateway's view of the cluster has both replicas
            yield lambda: base
        finally:
            for child in reversed(children):
                child.stop(grace=10)


@contextmanager
def round_robin(root: Path, model: Path, flags: list[str]) -> Iterator[Sender]:
    ports = [free_port(), free_port()]
    servers = [
        Child(
            f"llama{i}",
            [
                str(resolve_binary()),
                "--model", str(model),
                "--host", "127.0.0.1",
                "--port", str(port),
                "--ctx-size", str(SLOTS * CTX_PER_SLOT),
                "--parallel", str(SLOTS),
                "--alias", MODEL,
                *flags,
            ],
            engine_env(),
            log=root / f"llama{i}.log",
        )
        for i, port in enumerate(ports)
    ]  # fmt: skip
    turn = iter(range(10**9))
    try:
        for server in servers:
            server.start()
        bases = [f"http://127.0.0.1:{p}" for p in ports]
        wait_until(lambda: all(_healthy(b) for b in bases), root)
        yield lambda: bases[next(turn) % 2]
    finally:
        for server in servers:
            server.stop(grace=10)


Sender = Callable[[], str]  # the base URL the next request goes to


def _ready_workers(base: str) -> int:
    try:
        return int(httpx.get(f"{base}/health", timeout=1).json().get("ready_workers", 0))
    except (httpx.HTTPError, ValueError):
        return 0


def _healthy(base: str) -> bool:
    try:
        return httpx.get(f"{base}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def wait_until(check: Callable[[], bool], root: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in root.glob("*.log"))
    raise RuntimeError(f"not up in {timeout:.0f} s:\n{logs}")


# -- the workloads ---------------------------------------------------------------------


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n))


def stream(
    http: httpx.Client, base: str, messages: list[dict[str, str]]
) -> tuple[float, str, dict[str, Any]]:
    """One streamed chat turn: TTFT (s), the reply's text, the usage."""
    body = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": REPLY_TOKENS,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.perf_counter()
    first: float | None = None
    text: list[str] = []
    usage: dict[str, Any] = {}
    with http.stream("POST", f"{base}/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {resp.read()!r}")
        for line in resp.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    first = first if first is not None else time.perf_counter() - sent
                    text.append(piece)
    return first if first is not None else time.perf_counter() - sent, "".join(text), usage


def conversation(send: Sender, seed: int, turns: int) -> list[Turn]:
    rng = random.Random(seed)
    messages = [{"role": "system", "content": f"conversation {seed}: " + words(rng, 350)}]
    out = []
    for t in range(1, turns + 1):
        messages.append({"role": "user", "content": words(rng, 12)})
        with httpx.Client(timeout=300) as http:  # a connection a turn: servers drop idle ones
            ttft, text, usage = stream(http, send(), messages)
            details = usage.get("prompt_tokens_details") or {}
            out.append(
                Turn(
                    t,
                    ttft,
                    int(usage.get("prompt_tokens", 0)),
                    int(details.get("cached_tokens", 0)),
                )
            )
            messages.append({"role": "assistant", "content": text})
    return out


def conversations(send: Sender, n: int, turns: int) -> tuple[list[Turn], float]:
    began = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        done = list(pool.map(lambda i: conversation(send, 1000 + i, turns), range(n)))
    return [t for conv in done for t in conv], time.perf_counter() - began


def no_prefix(send: Sender, requests: int = 48, parallel: int = 8) -> float:
    """Completion tokens a second over prompts that share nothing."""
    rng = random.Random(7)
    prompts = [f"{i} " + words(rng, 50) for i in range(requests)]

    def one(prompt: str) -> int:
        with httpx.Client(timeout=300) as http:
            _, _, usage = stream(http, send(), [{"role": "user", "content": prompt}])
        return int(usage.get("completion_tokens", 0))

    began = time.perf_counter()
    with ThreadPoolExecutor(parallel) as pool:
        tokens = sum(pool.map(one, prompts))
    return tokens / (time.perf_counter() - began)


# -- the run -----------------------------------------------------------------------------


def measure(send: Sender, n: int, turns: int) -> Result:
    conversations(send, 2, 1)  # warm-up: every process and connection path, other prompts
    result = Result()
    result.turns, result.conversations_s = conversations(send, n, turns)
    result.no_prefix_tok_s = no_prefix(send)
    return result


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summary(r: Result, turns: int) -> dict[str, Any]:
    per_turn = {}
    for t in range(1, turns + 1):
        ttfts = [x.ttft * 1000 for x in r.turns if x.turn == t]
        per_turn[t] = {"p50_ms": round(pct(ttfts, 50), 1), "p99_ms": round(pct(ttfts, 99), 1)}
    later = [x.ttft * 1000 for x in r.turns if x.turn > 1]
    prompt = sum(x.prompt_tokens for x in r.turns if x.turn > 1)
    cached = sum(x.cached_tokens for x in r.turns if x.turn > 1)
    return {
        "ttft_by_turn": per_turn,
        "ttft_later_turns_p50_ms": round(statistics.median(later), 1),
        "conversations_s": round(r.conversations_s, 2),
        "cached_share_later_turns": round(cached / prompt, 3) if prompt else 0.0,
        "system_prompt_tokens": min(x.prompt_tokens for x in r.turns if x.turn == 1),
        "no_prefix_tokens_per_s": round(r.no_prefix_tok_s, 1),
    }


def report(s: dict[str, dict[str, Any]], turns: int, n: int, flags: list[str]) -> None:
    first = s["affinity"]
    print(
        f"\n{n} conversations x {turns} turns, system prompts of ~{first['system_prompt_tokens']}"
        f" tokens, replies of {REPLY_TOKENS}; 2 replicas x {SLOTS} slots"
        f"{'; engine flags: ' + ' '.join(flags) if flags else ''}"
    )
    print("TTFT p50 / p99 ms by turn   " + "".join(f"{name:>22}" for name in SETUPS))
    for t in range(1, turns + 1):
        cells = [s[k]["ttft_by_turn"][t] for k in SETUPS]
        print(
            f"  turn {t}                    "
            + "".join(f"{c['p50_ms']:>12.1f} / {c['p99_ms']:<7.1f}" for c in cells)
        )
    rows = (
        ("turns 2+ TTFT p50 ms", "ttft_later_turns_p50_ms"),
        ("conversations, s", "conversations_s"),
        ("cached share, turns 2+", "cached_share_later_turns"),
        ("no prefix, tokens/s", "no_prefix_tokens_per_s"),
    )
    for label, key in rows:
        print(f"{label:<28}" + "".join(f"{s[k][key]:>22}" for k in SETUPS))
    for other in ("shared", "round_robin"):
        gain = s[other]["ttft_later_turns_p50_ms"] / max(first["ttft_later_turns_p50_ms"], 1e-9)
        tput = first["no_prefix_tokens_per_s"] / max(s[other]["no_prefix_tokens_per_s"], 1e-9)
        print(
            f"affinity vs {other}: turns 2+ TTFT p50 {gain:.2f}x lower; "
            f"no-prefix throughput {tput:.3f}x"
        )


def main() -> int:
    global SLOTS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument(
        "--slots",
        type=int,
        default=SLOTS,
        help=f"slots per replica (default {SLOTS}: one per conversation in all)",
    )
    ap.add_argument(
        "--engine-flags", default="", help='extra llama-server flags, e.g. "--cache-ram 0"'
    )
    ap.add_argument("--json", action="store_true", help="print the summary as JSON too")
    args = ap.parse_args()
    flags = args.engine_flags.split()
    SLOTS = args.slots
    out: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="corral-bench-aff-") as tmp:
        root = Path(tmp)
        progress("generating the model (512-dim, 8 layers)...")
        model = make_model(
            root / "m512.gguf",
            n_embd=512,
            n_layer=8,
            n_head=8,
            n_head_kv=8,
            n_ff=1536,
            ctx=CTX_PER_SLOT,
        )
        for name in SETUPS:
            progress(f"{name}: starting...")
            here = root / name
            here.mkdir()
            if name == "round_robin":
                setup = round_robin(here, model, flags)
            else:
                setup = corral(here, model, name == "affinity", flags)
            with setup as send:
                progress(f"{name}: measuring...")
                out[name] = summary(measure(send, args.conversations, args.turns), args.turns)
                progress(f"{name}: {json.dumps(out[name])}")
    report(out, args.turns, args.conversations, flags)
    if args.json:
        print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

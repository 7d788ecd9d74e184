"""Shared parts of bench_cost.py, bench_burst.py, bench_scale.py and bench_memory.py.

- `Cluster`: a Corral of real processes (an embedded Valkey, `corral gateway`s, `corral
  worker`s) started from a config file, stopped with everything it started.
- `CpuMeter`: the CPU time each of its processes used, from `/proc/<pid>/stat` (user +
  system, all threads; a worker's pool children and its engine apart from its main
  process), and Valkey's `INFO commandstats`.
- `fetch`: a lean asyncio HTTP/1.1 client for one request, streaming or not, that records
  the time to the first content token, so that the client itself costs little next to
  what it measures (httpx's pure-Python parser costs several times more per stream).

Scripts here are run as `python benchmarks/NAME.py`, so they import this as `rig`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import psutil
import redis

from common.net import free_port
from corral.procs import Child
from corral.redis_server import EmbeddedRedis

TICK = os.sysconf("SC_CLK_TCK")
CORRAL = [sys.executable, "-m", "corral"]


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def entry(
    parser: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace], int],
    argv: list[str] | None = None,
) -> int:
    """A script's `main`: parse, `run`; SIGTERM and Ctrl-C stop it with every child process
    (each script stops its cluster on the way out)."""
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return run(args)
    except KeyboardInterrupt:
        progress("interrupted: every child process was stopped")
        return 130


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def pct(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100); NaN for no values."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# -- the cluster ------------------------------------------------------------------------------
@dataclass
class Cluster:
    """Valkey, `gateways` gateways and one worker per entry of `workers` (its extra argv,
    e.g. `["--model", "sim", "--slots", "4"]`), all reading `config`."""

    workdir: Path
    config: Path
    gateways: int = 1
    workers: list[list[str]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    valkey: EmbeddedRedis = field(init=False)
    ports: list[int] = field(default_factory=list)
    children: list[Child] = field(default_factory=list)

    @property
    def bases(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.ports]

    def role_pids(self) -> dict[str, int]:
        """Each child's pid by its name (`gateway-0`, `worker-3`) and Valkey's."""
        pids = {c.name: c.pid for c in self.children if c.pid is not None}
        info = redis.Redis.from_url(self.valkey.url).info("server")
        return {**pids, "valkey": int(info["process_id"])}

    def start(self, timeout: float = 300.0) -> None:
        """Everything, then wait until every gateway sees every worker ready."""
        self.valkey = EmbeddedRedis()
        self.valkey.start()
        for i in range(self.gateways):
            port = free_port()
            self.ports.append(port)
            self._spawn(f"gateway-{i}", ["gateway", *self._common(), "--port", str(port)])
        workers, self.workers = self.workers, []
        self.add_workers(workers, timeout)

    def add_workers(self, workers: list[list[str]], timeout: float = 300.0, batch: int = 8) -> None:
        """Start more workers, `batch` at a time (each imports Celery and starts its
        engine: on 2 cores, dozens at once take minutes), and wait until they are ready."""
        deadline = time.monotonic() + timeout
        for first in range(0, len(workers), batch):
            for extra in workers[first : first + batch]:
                name = f"worker-{len(self.workers)}"
                self._spawn(name, ["worker", *self._common(), "--no-banner", *extra])
                self.workers.append(extra)
            self.wait_ready(len(self.workers), deadline)

    def _common(self) -> list[str]:
        return ["--redis-url", self.valkey.url]

    def _spawn(self, name: str, argv: list[str]) -> None:
        env = {"CORRAL_LOG_LEVEL": "WARNING", "CORRAL_CONFIG": str(self.config), **self.env}
        child = Child(name, [*CORRAL, *argv], env, log=self.workdir / f"{name}.log")
        child.start()
        self.children.append(child)

    def wait_ready(self, workers: int, deadline: float) -> None:
        with httpx.Client(timeout=5.0) as http:
            while True:
                for c in self.children:
                    if c.poll() is not None:
                        raise RuntimeError(f"{c.name} exited: {self.tail(c.name)}")
                seen = []
                for base in self.bases:
                    try:
                        seen.append(int(http.get(f"{base}/health").json().get("ready_workers", 0)))
                    except (httpx.HTTPError, ValueError):
                        seen.append(-1)
                if seen and min(seen) >= workers:
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"gateways see {seen} ready workers, wanted {workers}")
                time.sleep(0.5)

    def tail(self, name: str, lines: int = 15) -> str:
        path = self.workdir / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        for child in reversed(self.children):  # workers (and their engines) first
            child.stop(grace=15.0)
        self.valkey.stop()


@contextmanager
def running(cluster: Cluster, timeout: float = 300.0) -> Iterator[Cluster]:
    try:
        cluster.start(timeout)
        yield cluster
    except Exception:
        for child in cluster.children:
            if child.poll() is not None or "gateway" in child.name:
                progress(f"--- {child.name} ---\n{cluster.tail(child.name)}")
        raise
    finally:
        cluster.stop()


# -- CPU time and Valkey's commands ------------------------------------------------------------
def proc_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds of `pid` (user + system, all its threads) and of its reaped children."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return 0.0, 0.0
    fields = raw[raw.rindex(b")") + 2 :].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime) / TICK, (cutime + cstime) / TICK


class CpuMeter:
    """CPU seconds per role. Roles: each gateway (`gateway-0`...), and summed over workers
    `worker` (their main processes: Celery's consumer), `pool` (their prefork children,
    which run the tasks), `engine` (llama-server or the load simulator), plus `valkey` and
    `client` (this process). The process tree is read once (`refresh`)."""

    def __init__(self, cluster: Cluster) -> None:
        self._cluster = cluster
        self._pids: dict[str, list[int]] = {}
        self._reaped: list[int] = []  # worker main processes: their cutime goes to `pool`
        self.refresh()

    def refresh(self) -> None:
        pids: dict[str, list[int]] = {"client": [os.getpid()]}
        self._reaped = []
        for name, pid in self._cluster.role_pids().items():
            if not name.startswith("worker"):
                pids.setdefault(name, []).append(pid)
                continue
            pids.setdefault("worker", []).append(pid)
            self._reaped.append(pid)
            try:
                kids = psutil.Process(pid).children(recursive=True)
                group = os.getpgid(pid)
            except (psutil.Error, OSError):
                continue
            for kid in kids:
                try:  # the engine runs in a process group of its own; the pool in ours
                    role = "pool" if os.getpgid(kid.pid) == group else "engine"
                except OSError:
                    continue
                pids.setdefault(role, []).append(kid.pid)
        self._pids = pids

    def pids(self, role: str) -> list[int]:
        return list(self._pids.get(role, []))

    def snapshot(self) -> Snapshot:
        out: dict[str, dict[int, float]] = {}
        for role, pids in self._pids.items():
            out[role] = {p: proc_cpu(p)[0] for p in pids}
        reaped = sum(proc_cpu(p)[1] for p in self._reaped)  # pool children that ended
        out.setdefault("pool", {})[0] = reaped
        return time.perf_counter(), machine_busy(), out

    @staticmethod
    def used(a: Snapshot, b: Snapshot) -> Used:
        seconds: dict[str, float] = {}
        busiest: dict[str, float] = {}
        for role, now in b[2].items():
            then = a[2].get(role, {})
            each = {p: max(0.0, s - then.get(p, 0.0)) for p, s in now.items()}
            seconds[role] = sum(each.values())
            busiest[role] = max(each.values(), default=0.0)
        return Used(b[0] - a[0], seconds, busiest, b[1] - a[1])


Snapshot = tuple[float, float, dict[str, dict[int, float]]]  # wall, machine busy, role->pid->s


@dataclass
class Used:
    wall: float
    seconds: dict[str, float]  # CPU seconds per role
    busiest: dict[str, float] = field(default_factory=dict)  # its busiest process's
    machine: float = 0.0  # CPU seconds the whole machine was busy

    def cores(self) -> dict[str, float]:
        return {k: v / self.wall for k, v in self.seconds.items()} if self.wall > 0 else {}

    def busiest_cores(self) -> dict[str, float]:
        return {k: v / self.wall for k, v in self.busiest.items()} if self.wall > 0 else {}


def gateway_cpu(seconds: dict[str, float]) -> float:
    return sum(v for k, v in seconds.items() if k.startswith("gateway"))


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy since boot (steal excluded)."""
    with open("/proc/stat") as f:
        parts = f.readline().split()
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in parts[1:8])
    return (user + nice + system + irq + softirq) / TICK


class CommandStats:
    """Valkey's commands between `reset()` and `read()`: {command: (calls, usec)}."""

    def __init__(self, url: str) -> None:
        self._r = redis.Redis.from_url(url)

    def reset(self) -> None:
        self._r.config_resetstat()

    def read(self) -> dict[str, tuple[int, int]]:
        raw = self._r.info("commandstats")
        out = {}
        for key, stats in raw.items():
            name = key.removeprefix("cmdstat_")
            if name in ("config", "info"):  # the meter's own
                continue
            out[name] = (int(stats["calls"]), int(stats["usec"]))
        return out


# -- the client --------------------------------------------------------------------------------
@dataclass
class Sample:
    sent: float  # perf_counter
    ttft: float | None = None  # seconds to the first content token (streams)
    done: float | None = None  # perf_counter at the end
    tokens: int = 0
    status: int = 0
    error: str | None = None


def chat_body(prompt: str, max_tokens: int, stream: bool, model: str) -> bytes:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


async def fetch(port: int, path: str, body: bytes | None = None, timeout: float = 300) -> Sample:
    """One request (POST with `body`, else GET) on a new connection, `Connection: close`.
    A `text/event-stream` reply is read event by event: `ttft` at the first non-empty
    `content`, `tokens` from the usage chunk; a JSON reply's `tokens` from its usage."""
    sample = Sample(time.perf_counter())
    try:
        async with asyncio.timeout(timeout):
            await _exchange(port, path, body, sample)
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
        sample.error = sample.error or f"{type(exc).__name__}: {exc}"
    sample.done = time.perf_counter()
    return sample


async def _exchange(port: int, path: str, body: bytes | None, sample: Sample) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        method = "POST" if body is not None else "GET"
        head = f"{method} {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        writer.write(head.encode() + b"\r\n" + (body or b""))
        status_line = await reader.readline()
        sample.status = int(status_line.split()[1])
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        chunks = _body(reader, headers)
        if headers.get("content-type", "").startswith("text/event-stream"):
            await _events(chunks, sample)
        else:
            raw = b"".join([c async for c in chunks])
            if sample.status != 200:
                sample.error = f"HTTP {sample.status}: {raw[:200]!r}"
            elif path.startswith("/v1/"):
                usage = json.loads(raw).get("usage") or {}
                sample.tokens = int(usage.get("completion_tokens") or 0)
    finally:
        writer.close()


async def _body(reader: asyncio.StreamReader, headers: dict[str, str]) -> Any:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                return
            yield await reader.readexactly(size)
            await reader.readexactly(2)
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        yield await reader.read()


async def _events(chunks: Any, sample: Sample) -> None:
    buf = b""
    async for chunk in chunks:
        buf += chunk
        *events, buf = buf.split(b"\n\n")
        for event in events:
            if not event.startswith(b"data: "):
                continue
            data = event[6:]
            if data == b"[DONE]":
                return
            if sample.ttft is None and b'"content":"' in data and b'"content":""' not in data:
                sample.ttft = time.perf_counter() - sample.sent
            if data.startswith(b'{"error"'):
                sample.error = data[:200].decode(errors="replace")
            elif b'"usage":{' in data:
                usage = json.loads(data).get("usage") or {}
                sample.tokens = int(usage.get("completion_tokens") or 0)
    sample.error = sample.error or "the stream ended without [DONE]"


# -- load shapes -------------------------------------------------------------------------------
Send = Callable[[int], Coroutine[Any, Any, Sample]]


async def open_loop(send: Send, rate: float, n: int) -> list[Sample]:
    """`n` requests sent `1/rate` s apart whatever the replies (a fixed request rate)."""
    t0 = time.perf_counter()
    tasks: list[asyncio.Task[Sample]] = []
    for i in range(n):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send(i)))
    return list(await asyncio.gather(*tasks))


async def closed_loop(send: Send, concurrency: int, seconds: float) -> list[Sample]:
    """`concurrency` lanes, each sending its next request when its last one ended, for
    `seconds` (requests under way then are finished and counted)."""
    deadline = time.perf_counter() + seconds
    out: list[Sample] = []
    counter = iter(range(10**9))

    async def lane() -> None:
        while time.perf_counter() < deadline:
            out.append(await send(next(counter)))

    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return out


async def burst(send: Send, n: int) -> list[Sample]:
    """`n` requests sent at once."""
    return list(await asyncio.gather(*(send(i) for i in range(n))))


class HealthProbe:
    """`GET /health` every `every` s from a process of its own (so that the latency is the
    server's, not this busy client's event loop), from `start()` to `stop()`, which returns
    each probe's latency in seconds (negative: it failed or was not a 200)."""

    def __init__(self, port: int, every: float = 0.05) -> None:
        self._argv = [sys.executable, __file__, "probe", str(port), str(every)]
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            *self._argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        assert self._proc.stdout is not None
        await self._proc.stdout.readline()  # "ready": its first probe is done

    async def stop(self) -> list[float]:
        assert self._proc is not None
        out, _ = await self._proc.communicate(b"stop\n")
        return [float(x) for x in json.loads(out.decode().strip().splitlines()[-1])]


def _probe(port: int, every: float) -> None:
    """The probe process: stops when its stdin says so (or closes)."""
    import http.client
    import select

    latencies: list[float] = []
    ready = False
    while True:
        t0 = time.perf_counter()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", "/health")
            ok = conn.getresponse().status == 200
            conn.close()
        except OSError:
            ok = False
        took = time.perf_counter() - t0
        latencies.append(took if ok else -took)
        if not ready:
            print("ready", flush=True)
            ready = True
        if select.select([sys.stdin], [], [], max(0.0, every - took))[0]:
            break
    print(json.dumps(latencies[1:]), flush=True)


if __name__ == "__main__" and sys.argv[1:2] == ["probe"]:
    _probe(int(sys.argv[2]), float(sys.argv[3]))

"""The fault suite: a steady mixed load against a real cluster while one fault at a time is
injected; what every request became.

The cluster: its own Valkey (append-only file on), two gateways, three workers (two slots
each) serving a generated model. The load: `--clients` clients, each sending one request
after another through the gateways in turn (a client that cannot connect to one tries the
other, as behind a load balancer): streaming and not, high, normal and low, with their
own `X-Request-ID`; and a batch of 20 items per fault. The faults, one at a time, each
after a few seconds of load and followed by a few more:

  worker kill -9, llama-server kill -9, gateway kill -9, rolling restart (SIGTERM, then
  start again, one by one: both gateways, then the three workers), Valkey kill -9 and
  restart, Valkey paused (SIGSTOP) 5 s.

For each it prints the requests sent, completed, ended with a clear error (an OpenAI error:
a status with the envelope, or a stream's error event), hung (no end by the deadline),
lost (its record never reached a final state), duplicated (finished twice by workers), the
batch's end, and the time to recover (from the fault until every gateway serves again).

Run:  python benchmarks/faults.py [--seconds 8] [--clients 6] [--only NAME] [--json]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from common.net import free_port
from corral.procs import Child
from corral.redis_server import EmbeddedRedis
from corral.tinymodel import make_model

MODEL = "faults"
DEADLINE_S = 60.0
HI = [{"role": "user", "content": "hi"}]


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Result:
    client_id: str
    stream: bool
    outcome: str = "hung"  # completed, error, hung
    detail: str = ""


@dataclass
class Rig:
    root: Path
    model: Path
    redis: EmbeddedRedis
    gateways: list[Child] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)
    workers: list[Child] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
        return {
            **base,
            "CORRAL_REDIS_URL": self.redis.url,
            "CORRAL_DRAIN_TIMEOUT": "5",
            "CORRAL_LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
        }

    def start(self) -> None:
        for i in range(2):
            port = free_port()
            self.ports.append(port)
            self.gateways.append(self._gateway(i, port))
        for i in range(3):
            self.workers.append(self._worker(i))
        for child in [*self.gateways, *self.workers]:
            child.start()
        wait(lambda: all(healthy(p) for p in self.ports), 60, "gateways")
        wait(lambda: ready_workers(self.ports[0]) == 3, 90, "workers")

    def _gateway(self, i: int, port: int) -> Child:
        argv = [sys.executable, "-m", "corral", "gateway", "--port", str(port)]
        return Child(f"gateway{i}", argv, self.env(), log=self.root / f"gateway{i}.log")

    def _worker(self, i: int) -> Child:
        argv = [
            sys.executable,
            "-m",
            "corral",
            "worker",
            "--model",
            str(self.model),
            "--slots",
            "2",
            "--ctx-size",
            "8192",
            "--no-banner",
        ]
        return Child(f"worker{i}", argv, self.env(), log=self.root / f"worker{i}.log")

    def stop(self) -> None:
        for child in [*self.workers, *self.gateways]:
            child.stop(grace=15)
        self.redis.stop()


def healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def ready_workers(port: int) -> int:
    try:
        return int(httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).json()["ready_workers"])
    except (httpx.HTTPError, ValueError, KeyError):
        return 0


def wait(check: Callable[[], bool], timeout: float, what: str) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"{what} not ready after {timeout:.0f} s")
        time.sleep(0.1)
    return time.monotonic() - started


# -- the load ----------------------------------------------------------------------------------
class Load:
    def __init__(self, rig: Rig, clients: int, seed: int) -> None:
        self.rig = rig
        self.results: list[Result] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._rng = random.Random(seed)
        self._threads = [
            threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(DEADLINE_S + 30)

    def _client(self, n: int) -> None:
        turn = n
        while not self._stop.is_set():
            stream = self._rng.random() < 0.5
            priority = self._rng.choice(["high", "normal", "low", "low"])
            result = Result(f"load-{n}-{turn}", stream)
            with self._lock:
                self.results.append(result)
            self._one(result, priority, turn)
            turn += 1

    def _one(self, result: Result, priority: str, turn: int) -> None:
        body = {"model": MODEL, "messages": HI, "max_tokens": 48, "stream": result.stream}
        headers = {
            "X-Request-Priority": priority,
            "X-Request-ID": result.client_id,
            "X-Request-Timeout": str(DEADLINE_S),
        }
        ports = self.rig.ports
        for attempt in range(len(ports) * 2):  # a gateway that is down: the other one
            port = ports[(turn + attempt) % len(ports)]
            try:
                self._send(port, body, headers, result)
                return
            except httpx.ConnectError:
                time.sleep(0.2)
            except httpx.HTTPError as exc:
                result.outcome, result.detail = "error", f"transport: {exc!r}"[:200]
                return
        result.outcome, result.detail = "error", "no gateway could be reached"

    @staticmethod
    def _send(port: int, body: dict[str, Any], headers: dict[str, str], result: Result) -> None:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        with httpx.stream("POST", url, json=body, headers=headers, timeout=DEADLINE_S + 10) as r:
            if r.status_code != 200:
                data = json.loads(r.read() or b"{}")
                result.outcome = "error" if "error" in data else "unclear"
                result.detail = str(data.get("error", {}).get("code") or r.status_code)
                return
            if not result.stream:
                data = json.loads(r.read())
                result.outcome = "completed" if data.get("choices") else "unclear"
                return
            lines = [x for x in r.iter_lines() if x.startswith("data: ")]
        if lines and lines[-1] == "data: [DONE]":
            last = json.loads(lines[-2].removeprefix("data: ")) if len(lines) > 1 else {}
            if "error" in last:
                result.outcome, result.detail = "error", str(last["error"].get("code"))
            else:
                result.outcome = "completed"
        else:
            result.outcome = "unclear"


# -- what happened -----------------------------------------------------------------------------
def records(rig: Rig, results: list[Result]) -> dict[str, str]:
    """client id -> the final state of its request's record ('' if never final)."""
    out: dict[str, str] = {}
    with httpx.Client(timeout=5) as http:
        for res in results:
            for port in rig.ports:
                try:
                    r = http.get(f"http://127.0.0.1:{port}/v1/requests/{res.client_id}")
                except httpx.HTTPError:
                    continue
                if r.status_code == 200:
                    out[res.client_id] = r.json()["state"]
                    break
                if r.status_code == 404:
                    out[res.client_id] = "unknown"
                    break
    return out


def finished_twice(rig: Rig) -> int:
    """Requests that workers finished (done) more than once, from their logs."""
    done: collections.Counter[str] = collections.Counter()
    pattern = re.compile(r"job=(req_\w+) worker=\S+ finished state=done")
    for path in rig.root.glob("worker*.log"):
        done.update(pattern.findall(path.read_text(errors="replace")))
    return sum(1 for n in done.values() if n > 1)


def submit_batch(port: int, n: int = 20) -> str:
    lines = [
        json.dumps(
            {
                "custom_id": f"item-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": MODEL, "messages": HI, "max_tokens": 8},
            }
        )
        for i in range(n)
    ]
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
        files = {"file": ("batch.jsonl", "\n".join(lines).encode(), "application/jsonl")}
        file_id = http.post("/v1/files", files=files, data={"purpose": "batch"}).json()["id"]
        body = {
            "input_file_id": file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        }
        return str(http.post("/v1/batches", json=body).json()["id"])


def batch_end(rig: Rig, batch_id: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for port in rig.ports:
            try:
                b = httpx.get(f"http://127.0.0.1:{port}/v1/batches/{batch_id}", timeout=5).json()
            except (httpx.HTTPError, ValueError):
                continue
            if b.get("status") in ("completed", "failed", "cancelled", "expired"):
                counts = b.get("request_counts", {})
                return f"{b['status']} {counts.get('completed', 0)}/{counts.get('total', 0)}"
        time.sleep(0.5)
    return "not ended"


# -- the faults --------------------------------------------------------------------------------
def kill_worker(rig: Rig) -> None:
    victim = rig.workers[0]
    assert victim.pid is not None
    os.kill(victim.pid, signal.SIGKILL)
    victim.proc.wait()  # type: ignore[union-attr]
    victim.start()  # as a supervisor (corral up, Kubernetes) would


def kill_llama_server(rig: Rig) -> None:
    assert rig.workers[1].pid is not None
    for p in psutil.Process(rig.workers[1].pid).children(recursive=True):
        if "llama-server" in p.name():
            p.kill()


def kill_gateway(rig: Rig) -> None:
    victim = rig.gateways[0]
    assert victim.pid is not None
    os.kill(victim.pid, signal.SIGKILL)
    victim.proc.wait()  # type: ignore[union-attr]
    victim.start()


def rolling_restart(rig: Rig) -> None:
    for i, gateway in enumerate(rig.gateways):
        gateway.stop(grace=20)
        gateway.start()
        wait(lambda i=i: healthy(rig.ports[i]), 60, "a restarted gateway")  # type: ignore[misc]
    for worker in rig.workers:
        worker.stop(grace=30)
        worker.start()
        wait(lambda: ready_workers(rig.ports[0]) == 3, 90, "a restarted worker")


def kill_valkey(rig: Rig) -> None:
    rig.redis._child.send_signal(signal.SIGKILL)
    rig.redis._child.proc.wait()  # type: ignore[union-attr]
    time.sleep(2)
    rig.redis = EmbeddedRedis(rig.root / "valkey", port=rig.redis.port).start()


def pause_valkey(rig: Rig) -> None:
    rig.redis._child.send_signal(signal.SIGSTOP)
    time.sleep(5)
    rig.redis._child.send_signal(signal.SIGCONT)


FAULTS: dict[str, Callable[[Rig], None]] = {
    "worker kill -9": kill_worker,
    "llama-server kill -9": kill_llama_server,
    "gateway kill -9": kill_gateway,
    "rolling restart": rolling_restart,
    "valkey kill -9": kill_valkey,
    "valkey paused 5 s": pause_valkey,
}


def serves(port: int) -> bool:
    body = {"model": MODEL, "messages": HI, "max_tokens": 2}
    try:
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=5)
        return r.status_code == 200
    except httpx.HTTPError:
        return False


def scenario(rig: Rig, name: str, seconds: float, clients: int, seed: int) -> dict[str, Any]:
    batch = submit_batch(rig.ports[0])
    load = Load(rig, clients, seed)
    load.start()
    time.sleep(seconds)
    injected = time.monotonic()
    FAULTS[name](rig)
    recovered = wait(lambda: all(serves(p) for p in rig.ports), 120, "the cluster")
    recovery = time.monotonic() - injected
    del recovered
    time.sleep(seconds)
    load.stop()
    states = records(rig, load.results)
    final = {"done", "failed", "cancelled", "expired"}
    out = {
        "fault": name,
        "sent": len(load.results),
        "completed": sum(r.outcome == "completed" for r in load.results),
        "clear_errors": sum(r.outcome == "error" for r in load.results),
        "hung": sum(r.outcome == "hung" for r in load.results),
        "unclear": sum(r.outcome == "unclear" for r in load.results),
        "lost": sum(states.get(r.client_id, "") not in final | {"unknown"} for r in load.results),
        "duplicated": finished_twice(rig),
        "recovery_s": round(recovery, 1),
        "batch": batch_end(rig, batch),
        "errors": collections.Counter(r.detail for r in load.results if r.outcome == "error"),
    }
    progress(f"  {name}: {out}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8, help="load before and after a fault")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--only", choices=list(FAULTS), help="one fault only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", type=Path, help="keep each cluster's logs under this folder")
    args = parser.parse_args()
    rows = []
    for name in [args.only] if args.only else list(FAULTS):
        with tempfile.TemporaryDirectory(prefix="faults-") as tmp:
            root = Path(tmp) if args.keep is None else args.keep / name.replace(" ", "-")
            root.mkdir(parents=True, exist_ok=True)
            model = make_model(root / f"{MODEL}.gguf", n_embd=256, n_layer=4, n_ff=512, ctx=8192)
            rig = Rig(root, model, EmbeddedRedis(root / "valkey").start())
            try:
                progress(f"{name}: starting a cluster...")
                rig.start()
                rows.append(scenario(rig, name, args.seconds, args.clients, args.seed))
            finally:
                rig.stop()
    head = ["fault", "sent", "completed", "clear errors", "hung", "lost", "duplicated"]
    print("\n| " + " | ".join([*head, "recovery", "batch"]) + " |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['fault']} | {r['sent']} | {r['completed']} | {r['clear_errors']} | "
            f"{r['hung'] + r['unclear']} | {r['lost']} | {r['duplicated']} | "
            f"{r['recovery_s']} s | {r['batch']} |"
        )
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

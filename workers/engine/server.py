"""Step 4 of the request path: the engine child a worker streams from (llama-server by
default, or any OpenAI-compatible server: `common.engines`).

One `EngineServer` = one child process = one model. Its lifecycle is the enum
stopped -> starting -> ready -> stopping -> stopped (or failed), after llama-swap's
`process.go`. The child binds 127.0.0.1 on a free port and runs in its own session, so
`stop()` can SIGTERM (then SIGKILL) the whole group, and it dies with the worker even when
the worker is killed with SIGKILL (`common.spawn`): no orphans, ever. Ready means the
engine's health path answers 200 and the child, or a process it started, holds the port.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import httpx
import psutil

from common.engines import EngineConfig, expand, llama_server
from common.errors import LlamaServerError
from common.net import free_port
from common.spawn import signal_group, spawn
from workers.engine.binary import child_env, exit_reason, resolve_binary

logger = logging.getLogger(__name__)

_LOG_RING = 200  # lines kept for error messages
HEALTH_POLL_S = 0.005  # a small model is ready in tens of milliseconds: ask often
_LOG_TAIL = 20  # lines put into an error message


class ServerState(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    FAILED = "failed"


@dataclass(frozen=True)
class LaunchSpec:
    """Everything needed to launch one engine child; `flags` go last so the user's win."""

    model_path: Path
    alias: str
    ctx_size: int
    parallel: int
    embedding: bool = False
    flags: tuple[str, ...] = ()
    port: int | None = None  # None: pick a free loopback port at start()
    binary: Path | None = None  # llama-server's; None: resolve_binary() if the command uses it
    env: Mapping[str, str] | None = None  # extra env, e.g. CUDA_VISIBLE_DEVICES (wins)
    log_name: str = ""  # prefix for the child's log lines, e.g. "worker=w1 model=m"
    cpu_threads: int | None = None  # a CPU worker's threads (llama-server: --threads)
    mmproj: Path | None = None  # a vision projector (--mmproj)
    on_exit: Callable[[], None] | None = None  # called (from a reader thread) on a crash
    engine: EngineConfig | None = None  # None: llama-server (`common.engines.llama_server`)

    def engine_config(self) -> EngineConfig:
        """The engine this spec runs: its own, or llama-server's command for this model
        (`--threads` only where llama.cpp's LLAMA_ARG_THREADS is not set)."""
        if self.engine is not None:
            return self.engine
        chosen = "LLAMA_ARG_THREADS" in {**os.environ, **(self.env or {})}
        threads = bool(self.cpu_threads) and not chosen
        mmproj = self.mmproj is not None
        return llama_server(embedding=self.embedding, mmproj=mmproj, threads=threads)


class EngineServer:
    """Supervisor of one engine child; the only writer of that child's state."""

    def __init__(self, spec: LaunchSpec) -> None:
        self.spec = spec
        self.engine = spec.engine_config()
        self.name = self.engine.program
        self._state = ServerState.STOPPED
        self._lock = threading.Lock()  # guards _state
        self._stop_lock = threading.Lock()  # serialises stop()
        self._proc: subprocess.Popen[bytes] | None = None
        self._port: int | None = spec.port
        self._reader: threading.Thread | None = None
        self._log: collections.deque[str] = collections.deque(maxlen=_LOG_RING)
        self._spawned_at = 0.0
        self._ids = f"alias={spec.alias} {spec.log_name}".strip()

    # -- read-only views -------------------------------------------------------------
    @property
    def state(self) -> ServerState:
        return self._state

    @property
    def port(self) -> int | None:
        return self._port

    @property
    def base_url(self) -> str:
        if self._port is None:
            raise LlamaServerError(f"{self.name} has no port yet: call start() first")
        return f"http://127.0.0.1:{self._port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc else None

    def last_log_lines(self, n: int = _LOG_TAIL) -> list[str]:
        return list(self._log)[-n:]

    def values(self) -> dict[str, object]:
        """What the engine command's placeholders stand for (`common.engines`)."""
        s = self.spec
        values: dict[str, object] = {
            "model_path": s.model_path,
            "host": "127.0.0.1",
            "port": "{port}" if self._port is None else self._port,  # chosen at start()
            "ctx_size": s.ctx_size,
            "ctx_per_slot": max(1, s.ctx_size // max(1, s.parallel)),
            "slots": s.parallel,
            "alias": s.alias,
            "mmproj": s.mmproj,
            "threads": s.cpu_threads,
        }
        if self.engine.uses("llama_server"):
            values["llama_server"] = s.binary or resolve_binary()
        return values

    def command(self) -> list[str]:
        """The argv this spec launches (also handy in error messages and docs)."""
        try:
            return expand(self.engine.command, self.values()) + list(self.spec.flags)
        except LlamaServerError as exc:
            raise LlamaServerError(f"{self.name} for {self.spec.alias}: {exc}") from None

    def child_environment(self, program: Path) -> dict[str, str]:
        """Ours, the engine's `env`, then the spec's (its GPU), and what the wheel's
        llama-server needs."""
        try:
            values = expand(list(self.engine.env.values()), self.values())
            extra = dict(zip(self.engine.env, values, strict=True))
        except LlamaServerError as exc:
            raise LlamaServerError(f"{self.name} for {self.spec.alias}: {exc}") from None
        return child_env(program, {**extra, **(self.spec.env or {})})

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        """Spawn the child and return at once; `ensure_ready()` waits for /health."""
        with self._lock:
            if self._state is not ServerState.STOPPED:
                raise LlamaServerError(f"cannot start {self.name} in state {self._state}")
            if self.spec.port is None:
                self._port = free_port()
            argv = self.command()
            self._log.clear()
            try:
                env = self.child_environment(Path(argv[0]))
                proc = spawn(argv, env, subprocess.PIPE, subprocess.STDOUT)
            except (OSError, subprocess.SubprocessError) as exc:
                raise LlamaServerError(f"cannot spawn {argv[0]}: {exc}") from exc
            self._proc = proc
            self._spawned_at = time.monotonic()
            self._state = ServerState.STARTING
            self._reader = threading.Thread(
                target=self._pump, args=(proc,), name=f"engine-log-{proc.pid}", daemon=True
            )
            self._reader.start()
        logger.info("%s spawned %s model=%s", self.name, self._tag(), self.spec.model_path)

    def ensure_ready(self, timeout: float) -> None:
        """Block until the health path answers 200 from our child; fail fast if the child
        exits or is stopped."""
        proc = self._proc
        if self._state is ServerState.READY:
            return
        if proc is not None and self._state is ServerState.FAILED:
            raise self._error(f"failed ({exit_reason(proc.poll())})")
        if proc is None or self._state is not ServerState.STARTING:
            raise LlamaServerError(f"{self.name} is {self._state.value}, not starting")
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0) as client:
            while True:
                if self._state in (ServerState.STOPPING, ServerState.STOPPED):
                    raise self._error("was stopped while starting")
                if proc.poll() is not None:
                    self._join_reader(2.0)
                    self._set_failed()
                    raise self._error(
                        f"exited with {exit_reason(proc.returncode)} before it was ready"
                        + self._missing_model()
                    )
                try:
                    healthy = client.get(self.base_url + self.engine.health).status_code == 200
                    if healthy and _listens(proc.pid, self._port):
                        break  # a 200 from another process on the port is not ours
                except httpx.TransportError:
                    pass  # not listening yet
                if time.monotonic() >= deadline:
                    err = self._error(f"not ready after {timeout:.1f}s")
                    self.stop()
                    raise err
                time.sleep(HEALTH_POLL_S)
        with self._lock:
            if self._state is not ServerState.STARTING:
                raise self._error("was stopped while starting")
            self._state = ServerState.READY
        ms = (time.monotonic() - self._spawned_at) * 1000
        logger.info("%s ready %s in %.0f ms", self.name, self._tag(), ms)

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the child's group, SIGKILL it after `grace` s, reap. Idempotent."""
        with self._stop_lock:
            proc = self._proc
            with self._lock:
                if proc is None or self._state is ServerState.STOPPED:
                    self._state = ServerState.STOPPED
                    return
                self._state = ServerState.STOPPING
            signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "%s %s ignored SIGTERM for %ss: SIGKILL", self.name, self._tag(), grace
                )
                signal_group(proc.pid, signal.SIGKILL)
                proc.wait()
            signal_group(proc.pid, signal.SIGKILL)  # stragglers in the group
            self._join_reader(2.0)
            with self._lock:
                self._state = ServerState.STOPPED
            logger.info("%s stopped %s rc=%s", self.name, self._tag(), proc.returncode)

    def __enter__(self) -> EngineServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- internals -------------------------------------------------------------------
    def _pump(self, proc: subprocess.Popen[bytes]) -> None:
        """Reader thread: child output -> ring buffer + DEBUG log; notices exits."""
        assert proc.stdout is not None
        prefix = f"[{self.name} {self._ids}] "
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                self._log.append(line)
                logger.debug("%s%s", prefix, line)
        proc.stdout.close()
        rc = proc.wait()
        if self._set_failed():
            logger.warning("%s exited unexpectedly %s %s", self.name, self._tag(), exit_reason(rc))
            if self.spec.on_exit is not None:
                self.spec.on_exit()

    def _set_failed(self) -> bool:
        """Mark an unexpected exit; False if it was expected (stopping) or already marked."""
        with self._lock:
            if self._state in (ServerState.STARTING, ServerState.READY):
                self._state = ServerState.FAILED
                return True
            return False

    def _join_reader(self, timeout: float) -> None:
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout)

    def _tag(self) -> str:
        return f"pid={self.pid} port={self._port} {self._ids}"

    def _missing_model(self) -> str:
        """A hint when llama-server's model file is gone: llama.cpp logs from a thread of
        its own and can exit before that thread wrote why. (Another engine's model may be a
        name, not a file.)"""
        path = self.spec.model_path
        if not self.engine.uses("llama_server") or path.exists():
            return ""
        return f" (its model file does not exist: {path})"

    def _error(self, what: str) -> LlamaServerError:
        tail = "\n".join(self.last_log_lines()) or "(no output)"
        return LlamaServerError(f"{self.name} {self._tag()} {what}; last log lines:\n{tail}")


def _listens(pid: int, port: int | None) -> bool:
    """Whether process `pid`, or a process it started, holds the listening socket on
    `port`: the port is chosen free but not held until the engine binds it, and whatever
    took it meanwhile would answer the health check while our child fails to bind. (A
    launcher script, or an engine that serves HTTP from a process of its own, listens from
    a descendant.)"""
    try:
        root = psutil.Process(pid)
        family = [root, *root.children(recursive=True)]
    except psutil.Error:
        return False
    for proc in family:
        try:
            sockets = proc.net_connections(kind="tcp")
        except psutil.Error:
            continue
        if any(_listening(c, port) for c in sockets):
            return True
    return False


def _listening(conn: Any, port: int | None) -> bool:
    return bool(conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port)

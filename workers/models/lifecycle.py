"""The model a worker holds and its llama-server child: every transition of one worker's
model state — load, serve, unload, fail, restart after a crash — as one state machine.

Only the model manager's thread calls it (`workers.models.manager`), which makes that thread the
single owner of the child (spawned from it, so PR_SET_PDEATHSIG is tied to a thread that
outlives it). Other threads only read (`child_pid`, `sample`).

Load:   LOADING -> spawn on the worker's fixed port -> ready -> measure memory -> serve
        (`runtime.Serving`) -> consume the model's queues (verified) -> READY.
Unload: UNLOADING -> stop serving (late tasks go back to their queue) -> stop consuming
        -> wait until no task runs -> stop the child -> EMPTY (or LOADING the next model).
Crash:  stop consuming (replicas take the work) -> restart with backoff -> READY, or after
        the third crash in five minutes `failed` on this worker until reset.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis

from common import redis_keys
from common.errors import LlamaServerError, QueueError
from common.estimate import estimate_file
from common.memory import MemoryRecord, device_of, profile
from common.registry import ModelState, WorkerState
from common.settings import ModelConfig, Settings
from workers.consumer.queues import QueueControl
from workers.hardware import usage
from workers.llama.binary import cpu_threads
from workers.llama.server import LaunchSpec, LlamaServer, ServerState
from workers.models.reporter import Reporter
from workers.models.restarts import CrashHistory
from workers.task.runtime import Serving

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    """The fixed facts of one worker."""

    worker_id: str
    slots: int
    budget_mb: int
    port: int  # llama-server's port for the worker's life: pool children know the URL
    binary: Path
    gpu: int | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def device(self) -> str:
        return device_of(None if self.gpu is None else str(self.gpu))


@dataclass
class _Held:
    """The model held now."""

    alias: str
    config: ModelConfig
    server: LlamaServer
    profile: str
    estimate_mb: int | None
    keep: bool  # pinned, preloaded or the worker's --model: never evicted nor idle-unloaded
    measured_mb: int | None = None
    loaded_at: float = field(default_factory=time.time)
    restarts: int = 0


class ModelHost:
    """One worker's model slot: what it holds, what failed here, and every transition."""

    def __init__(
        self,
        settings: Settings,
        spec: WorkerSpec,
        client: redis.Redis,
        reporter: Reporter,
        queues: QueueControl,
        serving: Serving,
        stop: threading.Event,
        on_loaded: Callable[[str, float], None] | None = None,
    ) -> None:
        self.settings = settings
        self.spec = spec
        self._redis = client
        self._report = reporter
        self._queues = queues
        self._serving = serving
        self._stop = stop
        self._on_loaded = on_loaded
        self.held: _Held | None = None
        self.failed: dict[str, str] = {}  # alias -> why, until reset
        self._crashes = CrashHistory()
        self._last_busy = 0.0

    # -- read from other threads ---------------------------------------------------------
    def child_pid(self) -> int | None:
        held = self.held
        return held.server.pid if held else None

    def sample(self) -> dict[str, object]:
        """Fast-moving registry fields, for each heartbeat."""
        held = self.held
        out: dict[str, object] = {"slots_busy": self._queues.running()}
        if held is not None:
            out["last_used"] = self.last_used(held)
            if held.server.state is ServerState.READY and held.server.pid is not None:
                used = usage.used_mb(held.server.pid, self.spec.gpu)
                if used is not None:
                    out["used_mb"] = used
        return out

    def last_used(self, held: _Held) -> float:
        if self._queues.reserved() > 0:
            self._last_busy = time.time()
        return max(held.loaded_at, self._last_busy, self._queues.last_received())

    # -- transitions (the manager thread only) -------------------------------------------
    def load(
        self,
        alias: str,
        config: ModelConfig,
        *,
        consume: bool,
        home: bool = False,
        lock: str | None = None,
    ) -> bool:
        """Load `alias` and serve it; on failure mark it failed here. True if served."""
        prof = profile(config, self.spec.slots, self.spec.device)
        known = usage.read(self._redis, alias, prof)
        need = config.vram_mb or (known.best_mb() if known else None)
        keep = home or config.pinned or self.settings.preloaded(alias, config)
        self._report.transition(
            WorkerState.LOADING,
            model=alias,
            next_model=None,
            used_mb=need,
            upstream=None,
            pinned=keep,
            restarts=0,
            loaded_at=None,
            error=None,
        )
        self._report.event(alias, ModelState.LOADING)
        self._report.release(alias, lock)  # the load is visible: other placements see it
        est = self._estimate(alias, config)
        server = LlamaServer(self._launch_spec(alias, config))
        started = time.monotonic()
        try:
            server.start()
            server.ensure_ready(self.settings.load_timeout)
        except LlamaServerError as exc:
            server.stop()
            self.fail(alias, f"load failed: {_brief(exc)}")
            return False
        measured = usage.used_mb(server.pid or 0, self.spec.gpu)
        held = _Held(alias, config, server, prof, est, keep, measured)
        self.held = held
        self._crashes.reset()
        usage.record(
            self._redis,
            alias,
            prof,
            MemoryRecord(estimate_mb=est, measured_mb=measured, worker=self.spec.worker_id),
        )
        if self._on_loaded is not None:
            self._on_loaded(alias, time.monotonic() - started)
        return self._go_ready(held, consume=consume, used_mb=measured or need or est)

    def _go_ready(self, held: _Held, *, consume: bool, used_mb: int | None) -> bool:
        self._serving.set(held.alias)
        if consume:
            try:
                self._queues.consume(redis_keys.worker_queues(held.alias))
            except QueueError as exc:
                log.error("worker=%s model=%s %s", self.spec.worker_id, held.alias, exc)
                self.unload()
                self.fail(held.alias, f"could not consume its queues: {exc}")
                return False
        self._report.transition(
            WorkerState.READY,
            model=held.alias,
            upstream=held.server.base_url,
            used_mb=used_mb,
            loaded_at=held.loaded_at,
            last_used=held.loaded_at,
            restarts=held.restarts,
        )
        self._report.event(held.alias, ModelState.READY)
        return True

    def unload(self, next_model: str | None = None, lock: str | None = None) -> None:
        held = self.held
        if held is None:
            return
        wid = self.spec.worker_id
        self._report.transition(WorkerState.UNLOADING, next_model=next_model)
        self._report.event(held.alias, ModelState.UNLOADING)
        if next_model is not None:
            self._report.release(next_model, lock)  # the swap is visible: next_model is set
        self._serving.set(None)
        try:
            self._queues.stop_consuming(redis_keys.worker_queues(held.alias))
        except QueueError as exc:
            log.error("worker=%s model=%s %s", wid, held.alias, exc)
        if not self._queues.drain(self.settings.task_time_limit, self._stop):
            log.warning("worker=%s model=%s unloading with tasks still running", wid, held.alias)
        if held.server.pid is not None and self.spec.gpu is None:
            peak = usage.peak_rss_mb(held.server.pid)
            usage.record(
                self._redis,
                held.alias,
                held.profile,
                MemoryRecord(
                    estimate_mb=held.estimate_mb,
                    measured_mb=held.measured_mb,
                    peak_mb=peak,
                    worker=wid,
                ),
            )
        held.server.stop()
        self.held = None
        self._report.event(held.alias, ModelState.OFF)
        if next_model is None:
            self._report.transition(
                WorkerState.EMPTY,
                model=None,
                upstream=None,
                used_mb=0,
                pinned=False,
                loaded_at=None,
                restarts=0,
            )

    def fail(self, alias: str, why: str) -> None:
        self.failed[alias] = why
        self._serving.set(None)
        self.held = None
        self._report.transition(
            WorkerState.EMPTY,
            model=None,
            next_model=None,
            upstream=None,
            used_mb=0,
            pinned=False,
            loaded_at=None,
            failed=dict(self.failed),
        )
        self._report.event(alias, ModelState.FAILED, error=why)

    def reset(self, alias: str) -> None:
        if self.failed.pop(alias, None) is not None:
            self._report.transition(self._state(), failed=dict(self.failed))
            self._report.event(alias, ModelState.OFF)
        if self.held is not None and self.held.alias == alias:
            self._crashes.reset()

    # -- health ----------------------------------------------------------------------------
    def on_crash(self, held: _Held) -> None:
        """Restart a crashed child with backoff, or give up: `failed` on this worker."""
        wid = self.spec.worker_id
        self._serving.set(None)
        try:  # let other replicas take the queued work meanwhile
            self._queues.stop_consuming(redis_keys.worker_queues(held.alias))
        except QueueError as exc:
            log.error("worker=%s model=%s %s", wid, held.alias, exc)
        while True:
            rc, tail = held.server.returncode, held.server.last_log_lines(3)
            held.server.stop()
            delay = self._crashes.record(time.monotonic())
            log.warning(
                "worker=%s model=%s llama-server crashed rc=%s (%d recent); %s",
                wid,
                held.alias,
                rc,
                self._crashes.recent,
                "giving up" if delay is None else f"restart in {delay:.0f}s",
            )
            if delay is None:
                window = f"{self._crashes.window:.0f}s"
                why = f"llama-server crashed {self._crashes.limit} times within {window} "
                why += f"(last rc={rc}): " + " | ".join(tail)
                self.fail(held.alias, why)
                return
            held.restarts += 1
            self._report.transition(WorkerState.LOADING, upstream=None, restarts=held.restarts)
            self._report.event(held.alias, ModelState.LOADING)
            if self._stop.wait(delay):
                return
            try:
                held.server.start()
                held.server.ensure_ready(self.settings.load_timeout)
                break
            except LlamaServerError as exc:
                log.warning("worker=%s model=%s restart failed: %s", wid, held.alias, _brief(exc))
        held.loaded_at = time.time()
        self._go_ready(held, consume=True, used_mb=None)

    def idle(self, held: _Held) -> bool:
        if self._queues.reserved() > 0:
            return False
        pipe = self._redis.pipeline(transaction=False)
        for q in redis_keys.worker_queues(held.alias):
            pipe.llen(q)
        return sum(pipe.execute()) == 0

    def idle_expired(self, held: _Held) -> bool:
        ttl = held.config.idle_ttl
        if held.keep or ttl <= 0:
            return False
        return time.time() - self.last_used(held) >= ttl and self.idle(held)

    # -- helpers ---------------------------------------------------------------------------
    def _launch_spec(self, alias: str, config: ModelConfig) -> LaunchSpec:
        return LaunchSpec(
            model_path=self.settings.resolve_model_path(config),
            alias=alias,
            ctx_size=config.ctx_size,
            parallel=self.spec.slots,
            embedding=config.embedding,
            flags=tuple(config.flags),
            port=self.spec.port,
            binary=self.spec.binary,
            env=self.spec.env,
            log_name=f"worker={self.spec.worker_id}",
            cpu_threads=cpu_threads() if self.spec.gpu is None else None,
        )

    def _estimate(self, alias: str, config: ModelConfig) -> int | None:
        try:
            est = estimate_file(
                self.settings.resolve_model_path(config),
                ctx_size=config.ctx_size,
                slots=self.spec.slots,
                flags=config.flags,
                device=self.spec.device,
            )
        except Exception as exc:  # a corrupt file: llama-server will say why, better
            log.info("worker=%s model=%s no estimate: %r", self.spec.worker_id, alias, exc)
            return None
        return est.total_mb

    def _state(self) -> WorkerState:
        return WorkerState.READY if self.held is not None else WorkerState.EMPTY

    def shutdown(self) -> None:
        held = self.held
        self._report.transition(WorkerState.STOPPING)
        if held is not None:
            self._serving.set(None)
            held.server.stop()
            self.held = None
            self._report.event(held.alias, ModelState.OFF)


def _brief(exc: BaseException, lines: int = 6) -> str:
    """An error message short enough for a registry entry and an HTTP reply."""
    text = str(exc).splitlines()
    head, tail = text[:1], [t for t in text[1:] if t.strip()][-lines:]
    return "\n".join(head + tail)[:1500]

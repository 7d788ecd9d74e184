"""The model a worker holds and its engine child (llama-server or another): every
transition of one worker's model state — load, serve, unload, fail, restart after a
crash — as one state machine.

Only the model manager's thread calls it (`workers.models.manager`), which makes that thread
the single owner of the child (spawned from it, so PR_SET_PDEATHSIG is tied to a thread that
outlives it) and of the worker's reservation on its device's ledger. Other threads only
read (`child_pid`, `sample`).

Load:   (checked first: `workers.models.preflight`) LOADING -> room reserved on the device
        (waiting for evictions under way) -> spawn on the worker's fixed port -> ready ->
        measure memory -> serve (`runtime.Serving`) -> consume its queues (verified) -> READY.
Unload: UNLOADING -> stop serving (late tasks go back to their queue) -> stop consuming
        -> wait until no task runs -> stop the child -> release the room -> EMPTY.
Crash:  `workers.models.restarts`: restart with backoff, or `failed` here until reset.
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
from common.commands import CommandOp, WorkerCommand
from common.errors import LlamaServerError, ModelBroken, QueueError
from common.memory import MemoryRecord, device_of
from common.registry import ModelState, WorkerState
from common.settings import ModelConfig, Settings
from workers.consumer.queues import QueueControl
from workers.engine.binary import cpu_threads
from workers.engine.server import EngineServer, LaunchSpec, ServerState
from workers.hardware import usage
from workers.hardware.ledger import DeviceLedger
from workers.models import affinity, preflight
from workers.models.reporter import Reporter
from workers.task.runtime import Serving

log = logging.getLogger(__name__)

ROOM_WAIT_S = 15.0  # how long a load waits for models being evicted to free their memory


@dataclass(frozen=True)
class WorkerSpec:
    """The fixed facts of one worker."""

    worker_id: str
    slots: int
    budget_mb: int
    port: int  # the engine's port for the worker's life: pool children know the URL
    binary: Path | None  # llama-server's (None: none here; only other engines can load)
    device: str  # its device's ledger (`common.devices`)
    gpu: int | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """ "cpu" or "gpu": what its memory figures mean (`common.memory.device_of`)."""
        return device_of(None if self.gpu is None else str(self.gpu))


@dataclass(frozen=True)
class Parts:
    """What the model manager and its state machine work with, built once at boot."""

    settings: Settings
    spec: WorkerSpec
    redis: redis.Redis
    report: Reporter
    queues: QueueControl
    serving: Serving
    ledger: DeviceLedger
    on_loaded: Callable[[str, float], None] | None = None


@dataclass
class Held:
    """The model held now."""

    alias: str
    config: ModelConfig  # as launched: path resolved, context a number
    server: EngineServer
    profile: str
    estimate_mb: int | None
    keep: bool  # pinned, preloaded or the worker's --model: never evicted nor idle-unloaded
    measured_mb: int | None = None
    loaded_at: float = field(default_factory=time.time)
    restarts: int = 0


class ModelHost:
    """One worker's model slot: what it holds, what failed here, and every transition."""

    def __init__(self, parts: Parts, stop: threading.Event) -> None:
        self.parts = parts
        self.settings = parts.settings
        self.spec = parts.spec
        self._redis = parts.redis
        self._report = parts.report
        self._queues = parts.queues
        self._serving = parts.serving
        self._ledger = parts.ledger
        self._stop = stop
        self.held: Held | None = None
        self.failed: dict[str, str] = {}  # alias -> why, fit for clients, until reset
        self.failed_detail: dict[str, str] = {}  # alias -> the whole story, for admins
        self._last_busy = 0.0

    # -- read from other threads ---------------------------------------------------------
    def child_pid(self) -> int | None:
        held = self.held
        return held.server.pid if held else None

    def engine_page(self) -> str | None:
        """The held model's engine metrics page while it serves; None if it has none."""
        held = self.held
        if held is None or held.server.state is not ServerState.READY:
            return None
        path = held.server.engine.metrics
        return held.server.base_url + path if path else None

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

    def last_used(self, held: Held) -> float:
        if self._queues.reserved() > 0:
            self._last_busy = time.time()
        return max(held.loaded_at, self._last_busy, self._queues.last_received())

    # -- transitions (the manager thread only) -------------------------------------------
    def prepare(self, alias: str, config: ModelConfig) -> preflight.Prepared:
        """Check `alias` can load here before anything is unloaded for it (raises
        `ModelBroken`)."""
        return preflight.prepare(
            self.settings,
            self._redis,
            alias,
            config,
            slots=self.spec.slots,
            device=self.spec.kind,
            budget_mb=self.spec.budget_mb,
        )

    def load(
        self,
        alias: str,
        ready: preflight.Prepared,
        *,
        consume: bool,
        home: bool = False,
        lock: str | None = None,
    ) -> bool:
        """Load a prepared `alias` and serve it. True if served; False if it failed here
        (marked so) or the device had no room for it in time (not a failure: placement
        decides again)."""
        keep = home or ready.config.pinned or self.settings.preloaded(alias, ready.config)
        self._report.transition(
            WorkerState.LOADING,
            model=alias,
            next_model=None,
            used_mb=ready.need_mb,
            upstream=None,
            pinned=keep,
            restarts=0,
            loaded_at=None,
            error=None,
            ctx_size=int(ready.config.ctx_size),
        )
        self._report.event(alias, ModelState.LOADING)
        self._report.release(alias, lock)  # the load is visible: other placements see it
        if not self._reserve(alias, ready):
            return False
        ready = self._grown(ready)
        config = ready.config
        server = EngineServer(self._launch_spec(alias, config))
        started = time.monotonic()
        try:
            server.start()
            server.ensure_ready(self.ready_timeout(config))
        except LlamaServerError as exc:
            server.stop()
            self.fail(alias, f"{server.name} could not load it ({_first_words(exc)})", str(exc))
            return False
        measured = usage.used_mb(server.pid or 0, self.spec.gpu)
        if measured is not None and measured > (ready.need_mb or 0):
            self._ledger.reserve(measured)  # the truth, when it is more than was asked
        held = Held(alias, config, server, ready.profile, ready.estimate_mb, keep, measured)
        self.held = held
        record = MemoryRecord(
            estimate_mb=ready.estimate_mb, measured_mb=measured, worker=self.spec.worker_id
        )
        usage.record(self._redis, alias, ready.profile, record)
        if self.parts.on_loaded is not None:
            self.parts.on_loaded(alias, time.monotonic() - started)
        return self.go_ready(held, consume=consume, used_mb=measured or ready.need_mb)

    def _reserve(self, alias: str, ready: preflight.Prepared) -> bool:
        """Room on the device for the load, waiting while evictions for it finish."""
        need = ready.need_mb or 1
        answer = self._ledger.wait_for_room(need, ROOM_WAIT_S, self._stop)
        if answer.reserved:
            return True
        log.info(
            "worker=%s model=%s no room: needs %d MiB, device %s has %s MiB free",
            self.spec.worker_id,
            alias,
            need,
            self.spec.device,
            answer.free_mb,
        )
        # Not a failure of the model: placement decides again, knowing the need.
        record = MemoryRecord(estimate_mb=ready.estimate_mb, worker=self.spec.worker_id)
        usage.record(self._redis, alias, ready.profile, record)
        self._report.event(alias, ModelState.OFF)
        self._report.transition(WorkerState.EMPTY, model=None, used_mb=0, pinned=False)
        return False

    def _grown(self, ready: preflight.Prepared) -> preflight.Prepared:
        """An `auto` context grown into the room its device has, now that its least is held."""
        free = self._ledger.room().free_mb
        if ready.shape is None or free is None:
            return ready
        grown = preflight.grow(ready, free, slots=self.spec.slots, device=self.spec.kind)
        if grown.need_mb and self._ledger.reserve(grown.need_mb).reserved:
            self._report.transition(
                WorkerState.LOADING, used_mb=grown.need_mb, ctx_size=int(grown.config.ctx_size)
            )
            return grown
        return ready

    def go_ready(self, held: Held, *, consume: bool, used_mb: int | None) -> bool:
        self._serving.set(held.alias)
        if consume:
            try:
                self._queues.consume(redis_keys.consumed_queues(held.alias, self.spec.worker_id))
            except QueueError as exc:
                log.error("worker=%s model=%s %s", self.spec.worker_id, held.alias, exc)
                self.unload()
                self.fail(held.alias, "the worker could not consume its queues", str(exc))
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
        affinity.register(self._redis, held.alias, self.spec.worker_id)
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
            self._queues.stop_consuming(redis_keys.consumed_queues(held.alias, wid))
        except QueueError as exc:
            log.error("worker=%s model=%s %s", wid, held.alias, exc)
        affinity.give_back(self._redis, held.alias, wid)
        if not self._queues.drain(self.settings.task_time_limit, self._stop):
            log.warning("worker=%s model=%s unloading with tasks still running", wid, held.alias)
        self._record_peak(held)
        held.server.stop()
        self._ledger.release()
        self.held = None
        if next_model is None:  # the entry first: a reader woken by the event finds it so
            self._report.transition(
                WorkerState.EMPTY,
                model=None,
                upstream=None,
                used_mb=0,
                pinned=False,
                loaded_at=None,
                restarts=0,
                ctx_size=None,
            )
        self._report.event(held.alias, ModelState.OFF)

    def fail(self, alias: str, why: str, detail: str | None = None) -> None:
        """`alias` cannot run here until reset: `why` for clients, `detail` for admins."""
        log.warning("worker=%s model=%s failed: %s", self.spec.worker_id, alias, detail or why)
        self.failed[alias] = why
        self.failed_detail[alias] = detail or why
        self._serving.set(None)
        self._ledger.release()
        self.held = None
        self._report.transition(
            WorkerState.EMPTY,
            model=None,
            next_model=None,
            upstream=None,
            used_mb=0,
            pinned=False,
            loaded_at=None,
            ctx_size=None,
            failed=dict(self.failed),
            failed_detail=dict(self.failed_detail),
        )
        self._report.event(alias, ModelState.FAILED, error=why)

    def broken(self, alias: str, err: ModelBroken) -> None:
        """A model found unloadable before anything was unloaded for it."""
        self.fail(alias, err.public, str(err))

    def reset(self, alias: str) -> None:
        if self.failed.pop(alias, None) is not None:
            self.failed_detail.pop(alias, None)
            self._report.transition(
                self._state(), failed=dict(self.failed), failed_detail=dict(self.failed_detail)
            )
            self._report.event(alias, ModelState.OFF)

    def idle(self, held: Held) -> bool:
        """Nothing running here and nothing waiting for the model (dead entries aside)."""
        if self._queues.reserved() > 0:
            return False
        pipe = self._redis.pipeline(transaction=False)
        for live in redis_keys.live_keys(held.alias):
            pipe.zcount(live, time.time(), "+inf")
        pipe.llen(redis_keys.batch_queue(held.alias))
        return sum(pipe.execute()) == 0

    def idle_expired(self, held: Held) -> bool:
        ttl = held.config.idle_ttl
        if held.keep or ttl <= 0:
            return False
        return time.time() - self.last_used(held) >= ttl and self.idle(held)

    def drain(self) -> None:
        """The worker is stopping: a task that arrives now goes back to its queue, no
        placement picks this worker, and what waits in its affinity queues goes to the
        shared ones (it waited up to `affinity_wait` for a spill); what runs may finish
        (`workers.consumer.drain`)."""
        self._serving.set(None)
        self._report.transition(WorkerState.STOPPING)
        held = self.held
        if held is not None:  # what waits for this replica's prompt cache: to the others now
            affinity.give_back(self._redis, held.alias, self.spec.worker_id)

    def shutdown(self) -> None:
        held = self.held
        self._report.transition(WorkerState.STOPPING)
        if held is not None:
            self._serving.set(None)
            held.server.stop()
            self.held = None
            self._report.event(held.alias, ModelState.OFF)
        self._ledger.leave()

    # -- helpers ---------------------------------------------------------------------------
    def ready_timeout(self, config: ModelConfig) -> float:
        return self.settings.load_timeout_for(config)

    def _record_peak(self, held: Held) -> None:
        if held.server.pid is None or self.spec.gpu is not None:
            return
        peak = usage.peak_rss_mb(held.server.pid)
        record = MemoryRecord(
            estimate_mb=held.estimate_mb,
            measured_mb=held.measured_mb,
            peak_mb=peak,
            worker=self.spec.worker_id,
        )
        usage.record(self._redis, held.alias, held.profile, record)

    def _launch_spec(self, alias: str, config: ModelConfig) -> LaunchSpec:
        return LaunchSpec(
            model_path=config.model_path,
            alias=alias,
            ctx_size=int(config.ctx_size),
            parallel=self.spec.slots,
            embedding=config.embedding,
            flags=tuple(config.flags),
            port=self.spec.port,
            binary=self.spec.binary,
            env=self.spec.env,
            log_name=f"worker={self.spec.worker_id}",
            mmproj=config.mmproj,
            on_exit=self._wake_manager,
            cpu_threads=cpu_threads() if self.spec.gpu is None else None,
            engine=config.custom_engine,
        )

    def _wake_manager(self) -> None:
        """The child died: have the manager look now rather than at its next tick, so it
        stops serving the model before a request the crash cut short comes back to it."""
        note = WorkerCommand(op=CommandOp.CHECK, model=self.held.alias if self.held else "")
        try:
            self._redis.lpush(
                redis_keys.worker_commands(self.spec.worker_id), note.model_dump_json()
            )
        except redis.RedisError as exc:
            log.warning("worker=%s could not wake its manager: %r", self.spec.worker_id, exc)

    def _state(self) -> WorkerState:
        return WorkerState.READY if self.held is not None else WorkerState.EMPTY


def _first_words(exc: BaseException) -> str:
    """What went wrong, without paths or the child's log lines: "exited with rc=1 before it
    was ready", "not ready after 120.0s"."""
    head = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    head = head.split("; last log lines:")[0]
    for marker in (" exited ", " not ready ", " was stopped ", " failed "):
        if marker in head:
            return marker.strip() + head.split(marker, 1)[1]
    return "it did not start"

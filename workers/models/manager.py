"""The worker's model manager: the one thread that owns the engine child and the
worker's model state (llama-swap's "one run loop, no locks").

It runs for the worker's whole life in its main process. It pops commands from the
worker's list in Redis (load / unload / reset, sent by a gateway's placer, `common.commands`)
and, between them, ticks: a crashed child is restarted with backoff, an idle model past its
`idle_ttl` is unloaded. The transitions themselves are `workers.models.lifecycle.ModelHost`'s.

A load the placer asked for on an older picture of the cluster is refused (the model it
meant to evict is busy now, or pinned, or another load got here first) and the placement
lock is released, so the placer decides again a tick later. A load is checked before
anything is unloaded for it (`workers.models.preflight`): a broken model evicts nothing.
"""

from __future__ import annotations

import json
import logging
import threading

import redis
from pydantic import ValidationError

from common import redis_keys
from common.commands import CommandOp, WorkerCommand
from common.errors import LlamaServerError, ModelBroken
from common.registry import WorkerState
from common.settings import ModelConfig
from workers.engine.server import ServerState
from workers.models.lifecycle import ModelHost, Parts, WorkerSpec
from workers.models.restarts import CrashHistory, restart_after_crash

log = logging.getLogger(__name__)

TICK_S = 0.25

__all__ = ["Manager", "Parts", "WorkerSpec"]


class Manager:
    def __init__(self, parts: Parts) -> None:
        self.settings = parts.settings
        self.spec = parts.spec
        self._redis = parts.redis
        self._report = parts.report
        self._stop = threading.Event()
        self.host = ModelHost(parts, self._stop)
        self._crashes = CrashHistory()
        self._preloaded = threading.Event()
        self._preload_error: str | None = None
        self._preload: tuple[str, ModelConfig] | None = None
        self._thread = threading.Thread(target=self._run, name="corral-models", daemon=True)

    # -- called from other threads ---------------------------------------------------------
    def start(self, preload: tuple[str, ModelConfig] | None = None) -> None:
        self._preload = preload
        self._thread.start()

    def wait_preloaded(self) -> None:
        """Block until the `--model` preload is done; raise if it failed."""
        self._preloaded.wait()
        if self._preload_error:
            raise LlamaServerError(self._preload_error)

    def stop(self, timeout: float = 15.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def child_pid(self) -> int | None:
        return self.host.child_pid()

    def request_drain(self) -> None:
        """From any thread: have the manager stop serving (the worker is stopping)."""
        note = WorkerCommand(op=CommandOp.DRAIN, model="")
        key = redis_keys.worker_commands(self.spec.worker_id)
        try:
            self._redis.lpush(key, note.model_dump_json())
        except redis.RedisError as exc:
            log.warning(
                "worker=%s could not tell its manager to drain: %r", self.spec.worker_id, exc
            )

    def sample(self) -> dict[str, object]:
        return self.host.sample()

    def engine_page(self) -> str | None:
        return self.host.engine_page()

    # -- the manager thread ----------------------------------------------------------------
    def _run(self) -> None:
        try:
            if self._preload is not None:
                alias, config = self._preload
                if not self._load(alias, config, consume=False, home=True):
                    self._preload_error = self.host.failed_detail.get(alias, "load failed")
                    return
        finally:
            self._preloaded.set()
        if self.host.held is None:
            self._report.transition(WorkerState.EMPTY)
        while not self._stop.is_set():
            try:
                command = self._next_command()
                if command is not None:
                    self._handle(command)
                self._tick()
            except Exception:  # keep managing: one bad command must not orphan the child
                log.exception("worker=%s model manager error", self.spec.worker_id)
                self._stop.wait(1.0)
        self.host.shutdown()

    def _next_command(self) -> WorkerCommand | None:
        try:
            item = self._redis.blpop([redis_keys.worker_commands(self.spec.worker_id)], TICK_S)
        except redis.RedisError as exc:
            log.warning("worker=%s cannot read commands: %r", self.spec.worker_id, exc)
            self._stop.wait(1.0)
            return None
        if item is None:
            return None
        try:
            return WorkerCommand.model_validate(json.loads(item[1]))
        except (ValueError, ValidationError) as exc:
            log.warning("worker=%s bad command %r: %s", self.spec.worker_id, item[1], exc)
            return None

    def _handle(self, cmd: WorkerCommand) -> None:
        wid, host = self.spec.worker_id, self.host
        log.info("worker=%s command=%s model=%s evict=%s", wid, cmd.op.value, cmd.model, cmd.evict)
        if cmd.op is CommandOp.CHECK:
            return  # the tick that follows every command looks at the child
        if cmd.op is CommandOp.DRAIN:
            host.drain()
            return
        if cmd.op is CommandOp.RESET:
            host.reset(cmd.model)
            self._crashes.reset()
        elif cmd.op is CommandOp.UNLOAD:
            held = host.held
            if held is None or held.alias != cmd.model:
                return
            refusal = self._refuse_eviction() if cmd.room_for else None
            if refusal:
                log.info(
                    "worker=%s keeps %s (room for %s): %s", wid, held.alias, cmd.room_for, refusal
                )
                return
            host.unload()
        elif cmd.op is CommandOp.LOAD:
            refusal = self._refuse(cmd)
            config = self._config_for(cmd)
            if refusal or config is None:
                log.info(
                    "worker=%s refused to load %s: %s",
                    wid,
                    cmd.model,
                    refusal or "no config for it",
                )
                self._report.release(cmd.model, cmd.lock)
                return
            self._load(cmd.model, config, consume=True, lock=cmd.lock)

    def _load(
        self,
        alias: str,
        config: ModelConfig,
        *,
        consume: bool,
        home: bool = False,
        lock: str | None = None,
    ) -> bool:
        """Check `alias`, then (only then) unload what is held, then load it."""
        host = self.host
        try:
            ready = host.prepare(alias, config)
        except ModelBroken as err:
            host.broken(alias, err)
            self._report.release(alias, lock)
            return False
        if host.held is not None:
            host.unload(next_model=alias, lock=lock)
        self._crashes.reset()
        return host.load(alias, ready, consume=consume, home=home, lock=lock)

    def _refuse(self, cmd: WorkerCommand) -> str | None:
        """Why this load must not happen (the placer saw an older picture), or None."""
        held, failed = self.host.held, self.host.failed
        if cmd.model in failed:
            return f"it failed here: {failed[cmd.model].splitlines()[0]}"
        if held is None:
            return None
        if held.alias == cmd.model:
            return "already loaded"
        if cmd.evict != held.alias:
            return f"holds {held.alias}, not {cmd.evict}"
        return self._refuse_eviction()

    def _refuse_eviction(self) -> str | None:
        """Why the held model must stay (pinned, busy), or None."""
        held = self.host.held
        if held is None:
            return None
        if held.keep or held.config.pinned:
            return f"{held.alias} is pinned"
        if not self.host.idle(held):
            return f"{held.alias} is busy"
        return None

    def _config_for(self, cmd: WorkerCommand) -> ModelConfig | None:
        """This worker's own config for the model if it has one (paths resolve here), else
        the gateway's."""
        own = self.settings.models.get(cmd.model)
        if own is not None:
            return self.settings.resolved(own)
        return cmd.config

    def _tick(self) -> None:
        held = self.host.held
        if held is None:
            return
        if held.server.state is ServerState.FAILED:
            restart_after_crash(self.host, held, self._crashes, self._stop)
        elif self.host.idle_expired(held):
            log.info(
                "worker=%s model=%s idle for %.0fs (idle_ttl): unloading",
                self.spec.worker_id,
                held.alias,
                held.config.idle_ttl,
            )
            self.host.unload()

"""Placement mechanics in the gateway: make sure a requested model is (being) loaded
somewhere, and that requests waiting on it end in an answer or a clear error.

- `ensure(alias, sub)`, before a request is enqueued: nothing to do if a copy is ready;
  else decide (`gateway.placement.policy`) under a per-alias `SET NX` lock in Redis, so ten cold
  requests on any number of gateways cause one load, and tell the chosen worker (a command
  on its list). "No worker could ever hold it" and "it failed" are raised here: the client
  gets the 503 before anything is queued. Otherwise the task waits in its queue.
- A watcher task ticks while requests wait on a model that is not ready
  (`gateway.placement.waiters`):
  it re-plans (the loading worker died, an eviction raced a request, all fitting workers
  were busy), hands a load failure to the waiting requests as their error, and ends them
  with 504 after `load_timeout` — never a hang.
- Every few seconds it also keeps `preload` models at their `replicas` (unless ejected).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from common import redis_keys
from common.commands import CommandOp, WorkerCommand, command_ttl
from common.errors import CorralError, ModelBroken
from common.locks import RELEASE_LUA
from common.registry import ModelEvent, ModelState, WorkerState
from common.settings import ModelConfig, Settings
from gateway.aio import Shared, cancel_and_wait
from gateway.catalog import Catalog
from gateway.cluster import View, read_view
from gateway.placement import policy
from gateway.placement.needs import Needs
from gateway.placement.policy import Outcome, Plan, plan_error
from gateway.placement.waiters import Waiters
from gateway.streaming.hub import Subscription

log = logging.getLogger(__name__)

TICK_S = 0.25
RECONCILE_S = 2.0
LOCK_TTL_S = 10.0  # the chosen worker releases it as soon as its entry shows the load
PENDING_S = 2.0  # a load sent but not yet in the worker's entry counts as loading this long
VIEW_MAX_AGE_S = 0.2
# On the request path a view this old will do to see that a model is ready: if it is not
# any more, the watcher, which re-checks the model of every request not started yet each
# tick on a fresh view, re-plans it. So most requests cost no registry read at all.
ENSURE_VIEW_MAX_AGE_S = 2.0
_UP = (ModelState.READY, ModelState.LOADING)


class Placer:
    def __init__(self, settings: Settings, client: aioredis.Redis, catalog: Catalog) -> None:
        self.settings = settings
        self._redis = client
        self._catalog = catalog
        self.needs = Needs(client)
        self._policy = policy.Policy(settings.min_residency, settings.max_swap_wait)
        self.waiters = Waiters(client, settings.load_timeout)
        self._view: View | None = None
        self._shared_view = Shared(self._read_view)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._said: dict[str, str] = {}  # alias -> last reconcile complaint (log once)
        # worker -> (alias, lock token, until): loads this gateway sent that the registry may
        # not show yet, so two placements a few ms apart do not both pick the same worker
        self._pending: dict[str, tuple[str, str, float]] = {}

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="corral-placer")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)

    # -- the request path ----------------------------------------------------------------
    async def ensure(self, alias: str, sub: Subscription | None = None) -> None:
        """Before enqueueing a request for `alias`: start a load if no copy is up."""
        if sub is not None:
            self.waiters.add(alias, sub)
        if (await self.view(ENSURE_VIEW_MAX_AGE_S)).ready(alias):
            return
        if (await self.view(VIEW_MAX_AGE_S)).ready(alias):  # it came up a moment ago
            return
        try:
            await self._place(alias, want=1, waited=0.0, raising=True)
        except BaseException:
            if sub is not None:
                self.waiters.discard(alias, sub)  # the request ends here, not queued
            raise

    async def ready_replicas(self, alias: str) -> list[str]:
        """The ids of the workers serving `alias` now, as `ensure` just saw them."""
        return [w.id for w in (await self.view(ENSURE_VIEW_MAX_AGE_S)).ready(alias)]

    # -- the management API --------------------------------------------------------------
    async def load(self, alias: str, replicas: int | None = None) -> Plan:
        """Place `replicas` copies (default: the config's); returns at once."""
        config = await self._catalog.get(alias)
        await self._redis.srem(redis_keys.EJECTED, alias)
        deadline = time.monotonic() + 3.0
        while True:  # an explicit load waits a moment for a placement already in flight
            plan = await self._place(alias, want=replicas or config.replicas, raising=True)
            if plan is not None or time.monotonic() > deadline:
                return plan or Plan(Outcome.LOADING, reason="a placement is in progress")
            await asyncio.sleep(0.1)

    async def eject(self, alias: str, known: bool = True) -> list[str]:
        """Unload `alias` everywhere; preload will not bring it back until a load. `known`:
        it must be in the catalog (404 if not)."""
        if known:
            await self._catalog.get(alias)
        await self._redis.sadd(redis_keys.EJECTED, alias)
        view = await self.view(0)
        targets = [w.id for w in view.workers if alias in (w.model, w.next_model)]
        for wid in targets:
            await self._send(wid, WorkerCommand(op=CommandOp.UNLOAD, model=alias))
        return targets

    async def reset(self, alias: str) -> dict[str, str]:
        """Clear `alias`'s failed state on every worker and the cluster's; returns where it
        was cleared -> the previous error ("cluster": found unloadable before a load)."""
        await self._catalog.get(alias)
        view = await self.view(0)
        cleared = {w.id: w.failed[alias] for w in view.workers if alias in w.failed}
        if alias in view.broken:
            await self._redis.hdel(redis_keys.MODELS_FAILED, alias)
            cleared["cluster"] = view.broken[alias]
            self._view = None
        for wid in cleared:
            await self._send(wid, WorkerCommand(op=CommandOp.RESET, model=alias))
        return cleared

    async def view(self, max_age: float) -> View:
        """The registry, read at most `max_age` seconds ago."""
        if self._view is not None and time.monotonic() - self._view.taken_at <= max_age:
            return self._view
        # A read under way is fresh enough for a caller that takes any age (a burst's
        # requests share it); one that wants a read from now on (0) makes its own.
        view = await (self._shared_view(None) if max_age > 0 else read_view(self._redis))
        if self._view is None or view.taken_at >= self._view.taken_at:
            self._view = view
        return view

    async def _read_view(self, _: None) -> View:
        return await read_view(self._redis)

    # -- deciding ------------------------------------------------------------------------
    async def _place(
        self, alias: str, *, want: int, waited: float = 0.0, raising: bool = False
    ) -> Plan | None:
        """Plan `alias`; send its loads under its lock (re-planned there, on a fresh view, so
        two gateways never both act). None: another placement of it is in flight."""
        config = await self._catalog.get(alias)
        config = self.settings.resolved(config)
        plan: Plan | None = await self._unloadable(alias, config)
        if plan is None:
            plan = await self._plan(alias, config, want, waited)
        if plan is not None and plan.outcome is Outcome.LOAD:
            plan = await self._place_locked(alias, config, want, waited)
        if plan is None:
            return None
        if raising and plan.outcome in (Outcome.NO_CAPACITY, Outcome.FAILED):
            raise plan_error(alias, plan)
        return plan

    async def _unloadable(self, alias: str, config: ModelConfig) -> Plan | None:
        """A FAILED plan for a model no worker may load (its file is not a loadable GGUF),
        found before any eviction is planned for it; None if it may load."""
        why = (await self.view(VIEW_MAX_AGE_S)).broken.get(alias)
        if why is None:
            try:
                await self.needs.shape(config)
                return None
            except ModelBroken as err:
                why = err.public
                await self._mark_broken(alias, why, config)
        return Plan(Outcome.FAILED, reason=f"to load: {why}")

    async def _check_files(self, view: View) -> None:
        """Read the header of each of this gateway's own models (once per file version):
        a broken one is listed failed before anyone asks for it. (After a reset it is
        checked again when a request asks for it, or when its file changes.)"""
        for alias, config in self._catalog.own.items():
            if alias in view.broken or self.needs.seen(config):
                continue
            try:
                await self.needs.shape(config)
            except ModelBroken as err:
                await self._mark_broken(alias, err.public, config)

    async def _mark_broken(self, alias: str, why: str, config: ModelConfig) -> None:
        log.warning("model=%s cannot load: %s (%s)", alias, why, config.model_path)
        event = ModelEvent(model=alias, worker="", state=ModelState.FAILED, error=why)
        pipe = self._redis.pipeline(transaction=False)
        pipe.hset(redis_keys.MODELS_FAILED, alias, why)
        pipe.publish(redis_keys.EVENTS, event.model_dump_json())
        await pipe.execute()
        self._view = None

    async def _plan(self, alias: str, config: ModelConfig, want: int, waited: float) -> Plan:
        view = await self.view(0)
        candidates = await self._candidates(alias, config, view)
        return policy.plan(
            alias,
            candidates,
            want=want,
            now=time.time(),
            waited=waited,
            policy=self._policy,
            rooms=view.rooms,
        )

    async def _place_locked(
        self, alias: str, config: ModelConfig, want: int, waited: float
    ) -> Plan | None:
        lock, token = redis_keys.placement_lock(alias), uuid.uuid4().hex
        if not await self._redis.set(lock, token, nx=True, px=int(LOCK_TTL_S * 1000)):
            return None
        sent = False
        try:
            plan = await self._plan(alias, config, want, waited)
            for out in plan.unloads:  # room on the device, before the load asks for it
                evict = WorkerCommand(op=CommandOp.UNLOAD, model=out.model, room_for=alias)
                await self._send(out.worker, evict)
                log.info("model=%s evicts model=%s worker=%s", alias, out.model, out.worker)
            for load in plan.loads:
                cmd = WorkerCommand(
                    op=CommandOp.LOAD, model=alias, config=config, evict=load.evict, lock=token
                )
                await self._send(load.worker, cmd)
                self._pending[load.worker] = (alias, token, time.monotonic() + PENDING_S)
                sent = True
                log.info(
                    "model=%s placed worker=%s evict=%s waited_s=%.1f",
                    alias,
                    load.worker,
                    load.evict,
                    waited,
                )
        finally:
            if not sent:  # the worker that takes the load releases it once its entry shows it
                await self._redis.eval(RELEASE_LUA, 1, lock, token)
        return plan

    async def _candidates(
        self, alias: str, config: ModelConfig, view: View
    ) -> list[policy.Candidate]:
        records = await self.needs.records(alias)
        await self._drop_picked_up()
        out = []
        for w in view.workers:
            room = view.rooms.get(w.device) if w.device else None
            held = room.reserved.get(w.id) if room is not None else None
            cand = policy.Candidate(
                id=w.id,
                state=w.state,
                budget_mb=w.budget_mb,
                need_mb=await self.needs.need_mb(config, w, records),
                model=w.model,
                next_model=w.next_model,
                pinned=w.pinned,
                loaded_at=w.loaded_at,
                last_used=w.last_used,
                failed=w.failed,
                busy=w.slots_busy > 0 or view.queued.get(w.model or "", 0) > 0,
                device=w.device,
                held_mb=held if held is not None else (w.used_mb if w.model else None),
            )
            out.append(self._with_pending(cand))
        return out

    async def _drop_picked_up(self) -> None:
        """Forget sent loads whose lock the worker released: its entry shows them now (or
        it refused them, which the next plan must also see)."""
        for wid, (alias, token, until) in list(self._pending.items()):
            held = await self._redis.get(redis_keys.placement_lock(alias))
            if time.monotonic() > until or held != token:
                self._pending.pop(wid, None)

    def _with_pending(self, cand: policy.Candidate) -> policy.Candidate:
        """A worker this gateway just sent a load to, as if its entry showed it already."""
        pending = self._pending.get(cand.id)
        if pending is None:
            return cand
        alias, _, until = pending
        if time.monotonic() > until or alias in (cand.model, cand.next_model):
            del self._pending[cand.id]
            return cand
        if cand.model is None:
            return dataclasses.replace(cand, state=WorkerState.LOADING, model=alias)
        return dataclasses.replace(cand, state=WorkerState.UNLOADING, next_model=alias)

    async def _send(self, worker_id: str, cmd: WorkerCommand) -> None:
        key = redis_keys.worker_commands(worker_id)
        pipe = self._redis.pipeline(transaction=False)
        pipe.rpush(key, cmd.model_dump_json())
        pipe.expire(key, command_ttl(self.settings.load_timeout))
        await pipe.execute()

    # -- the watcher ---------------------------------------------------------------------
    async def _run(self) -> None:
        next_reconcile = 0.0
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow the cancel that
            # stop() sends when it lands as the wait times out, and stop() then hangs.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK_S):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self._watch()
                if time.monotonic() >= next_reconcile:
                    next_reconcile = time.monotonic() + RECONCILE_S
                    await self._reconcile()
            except (RedisError, OSError) as exc:
                log.warning("placer: Redis trouble: %r", exc)
                await asyncio.sleep(1.0)
            except Exception:
                log.exception("placer: unexpected error")
                await asyncio.sleep(1.0)

    async def _watch(self) -> None:
        """Re-plan each model requests wait on while no copy of it is ready."""
        for alias in self.waiters.models():
            view = await self.view(TICK_S / 2)
            if view.ready(alias):
                self.waiters.served(alias)
                continue
            waiting = await self.waiters.waiting(alias)
            if not waiting:
                continue
            longest = max(w for _, w in waiting)
            try:
                plan = await self._place(alias, want=1, waited=longest, raising=True)
                limit = self.settings.load_timeout_for(await self._catalog.get(alias))
            except CorralError as err:
                self.waiters.fail(alias, [s for s, _ in waiting], err)
                continue
            if plan is not None and plan.reason:
                self.waiters.why[alias] = plan.reason
            self.waiters.expire(alias, waiting, limit)

    async def _reconcile(self) -> None:
        """Keep the catalog to the running configs (a new GGUF in models_dir appears, a
        model nobody announces goes) and preloaded models at their replicas."""
        self._catalog.rescan()
        await self._catalog.announce()
        view = await self.view(TICK_S)
        held = {m for w in view.workers for m in (w.model, w.next_model) if m}
        await self._catalog.prune(held)
        await self._check_files(view)
        models = await self._catalog.all()
        wanted = {a: m for a, m in models.items() if self.settings.preloaded(a, m)}
        if not wanted:
            return
        ejected = set(map(str, await self._redis.smembers(redis_keys.EJECTED)))
        view = await self.view(TICK_S)
        for alias, model in wanted.items():
            have = sum(w.model_state(alias) in _UP for w in view.workers)
            if alias in ejected or have >= model.replicas:
                continue
            try:
                await self._place(alias, want=model.replicas, raising=True)
            except CorralError as err:
                if self._said.get(alias) != err.message:
                    self._said[alias] = err.message
                    log.warning("model=%s cannot preload: %s", alias, err.message)

"""Step 5 → 6 of the request path: frames from workers, back to the request that waits.

One pub/sub connection per gateway process (`gateway.streaming.pubsub`), multiplexed over all
requests: it subscribes once to the pattern of this gateway's channels
(`corral:chan:<gateway id>:*`), so every request's channel is subscribed before its task
is enqueued, without a SUBSCRIBE per request. Each message is routed to the request's
`Subscription` as soon as it is read. The same connection hears `redis_keys.KEYS_CHANGED`: each
note (and each reconnection, when notes may have been missed) is passed on
(`on_keys_changed`: a new `KeysEpoch`), which invalidates cached key lookups. Each
(re)connection goes to the current master (through Sentinel, asked anew each time); the
frames of requests in flight when it broke are lost with it, so those requests fail. A
queued request the broker itself lost (a failover, a restart that lost its last writes) is
queued again once it is back (`gateway.streaming.recovery`).

A subscription turns silence into errors, so no client ever hangs: a frame out of
sequence ends the stream (`StreamBroken`); a worker whose heartbeat key expired ends it
(`WorkerLost`); a deadline passed ends it (`Timeout`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from common import redis_keys
from common.errors import (
    CorralError,
    NoCapacity,
    StreamBroken,
    Timeout,
    WorkerLost,
    from_body,
)
from common.frames import Frame, FrameType
from common.redis_conn import RedisTarget
from gateway.aio import cancel_and_wait
from gateway.streaming.pubsub import PubSubConnection
from gateway.streaming.recovery import LostRequests, Requeue

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 1.0  # silence after which the worker's heartbeat is checked
READY_WAIT_S = 5.0  # how long a new request waits for a reconnecting pub/sub connection
SUBSCRIBE_TIMEOUT_S = 10.0  # to connect and subscribe, before trying again
RECONNECT_MAX_S = 1.0  # the longest pause between attempts (0.1 s, doubled each time)
_KEYS_CHANGED = redis_keys.KEYS_CHANGED.encode()


class Subscription:
    """The frames of one request, in order, or the error that ended them."""

    def __init__(
        self, hub: StreamHub, request_id: str, deadline: float, restartable: bool = False
    ) -> None:
        self._hub = hub
        self.request_id = request_id
        self.requeue: Requeue | None = None  # set once enqueued (`StreamHub.enqueued`)
        self.opened_in = 0  # the hub's connection losses before it was opened
        self.deadline = deadline
        self.restartable = restartable  # nothing is relayed before the end (non-streaming)
        self.worker: str | None = None
        self.started_at: float | None = None  # perf_counter() at its first START frame
        self.finished = False
        self.usage: dict[str, Any] | None = None  # the final frame's (rate limits, metrics)
        self.relayed = 0  # chunks received (a token each): the usage of a stream cut short
        self._queue: asyncio.Queue[Frame | CorralError] = asyncio.Queue()
        self._next_seq = 0

    def restart(self) -> None:
        """Expect a new stream from seq 0 (the request was queued again)."""
        self.worker = None
        self.finished = False
        self._next_seq = 0

    def deliver(self, item: Frame | CorralError) -> None:
        self._queue.put_nowait(item)

    def close(self) -> None:
        self._hub.close(self.request_id)

    async def next(self) -> Frame:
        """The next frame; a worker's error frame is raised as its CorralError."""
        frame = await self._next_raw()
        if frame.type is FrameType.START and frame.seq == 0 and self.restartable:
            # Its task began again (a pool child died and Celery queued it once more; its
            # claim lets it run twice at most): nothing was sent, so take the new run.
            self.restart()
        if frame.seq == -1 and frame.final:
            pass  # out of band (a cancel from another gateway, a redelivery's verdict)
        elif frame.seq != self._next_seq:
            raise StreamBroken(
                f"Lost part of the stream (frame {self._next_seq} missing, got {frame.seq})."
            )
        self._next_seq += 1
        if frame.type is FrameType.START:
            self.worker = frame.worker
            if self.started_at is None:  # its queue wait ends (a restart does not reset it)
                self.started_at = time.perf_counter()
        elif frame.type is FrameType.CHUNKS:
            self.relayed += len(frame.chunks)
        if frame.final:
            self.finished = True
            self.usage = frame.usage
        if frame.type is FrameType.ERROR:
            assert frame.error is not None
            raise from_body(frame.error, frame.status or 500)
        return frame

    async def frames(self) -> AsyncIterator[Frame]:
        """The frames after START (ACCEPTED, CHUNKS, …), until the final one."""
        while not self.finished:
            frame = await self.next()
            if frame.type is not FrameType.START:
                yield frame

    async def _next_raw(self) -> Frame:
        while True:
            remaining = self.deadline - time.time()
            if remaining <= 0:
                where = "." if self.worker else " (still queued: no worker took it in time)."
                raise Timeout("The request did not complete within its deadline" + where)
            if self._queue.empty():
                # Only a started request has a worker to watch: a queued one sleeps until
                # its first frame or its deadline (thousands may wait; no timer churn).
                wait = remaining if self.worker is None else min(WATCH_INTERVAL_S, remaining)
                try:
                    async with asyncio.timeout(wait):
                        item = await self._queue.get()
                except TimeoutError:
                    await self._check_worker()
                    continue
            else:  # a frame already here is taken without arming a timer
                item = self._queue.get_nowait()
            if isinstance(item, CorralError):
                raise item
            return item

    async def _check_worker(self) -> None:
        if self.worker is None:
            return
        if not await self._hub.worker_alive(self.worker):
            raise WorkerLost(f"The worker serving this request ({self.worker}) stopped responding.")


class StreamHub:
    """Owns the gateway's pub/sub connection and the table of open subscriptions."""

    def __init__(
        self,
        client: aioredis.Redis,
        gateway_id: str,
        target: RedisTarget,
        on_keys_changed: Callable[[], None] = lambda: None,
    ) -> None:
        self._redis = client  # for heartbeat checks; the pub/sub connection is its own
        self._target = target  # asked for the current master at each (re)connection
        self.gateway_id = gateway_id
        self._subs: dict[str, Subscription] = {}
        self._reader: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._keys_changed = on_keys_changed  # API keys may have changed: drop cached lookups
        self.incidents = 0  # pub/sub connections lost (each a broker the requests may miss)
        self._lost = LostRequests(client, gateway_id)

    def channel(self, request_id: str) -> str:
        return redis_keys.channel(self.gateway_id, request_id)

    async def start(self) -> None:
        self._reader = asyncio.create_task(self._read_forever(), name="corral-stream-hub")
        await asyncio.wait_for(self._ready.wait(), timeout=10)

    async def stop(self) -> None:
        if self._reader is not None:
            await cancel_and_wait(self._reader)
        await self._lost.stop()
        self._fail_all(StreamBroken("The gateway is shutting down."))

    async def open(
        self, request_id: str, deadline: float, restartable: bool = False
    ) -> Subscription:
        """A subscription for the request's frames, once the hub is subscribed: while it
        reconnects, what a worker publishes reaches nobody (the worker then gives the task
        up), so a request waits for it here, `READY_WAIT_S` at most, then gets a 503."""
        if not self._ready.is_set():
            try:
                async with asyncio.timeout(READY_WAIT_S):
                    await self._ready.wait()
            except TimeoutError:
                raise NoCapacity(
                    "The gateway lost its connection to Redis and is reconnecting; retry.",
                    code="redis_unavailable",
                    retry_after=2,
                ) from None
        sub = Subscription(self, request_id, deadline, restartable)
        sub.opened_in = self.incidents
        self._subs[request_id] = sub
        return sub

    def close(self, request_id: str) -> None:
        self._subs.pop(request_id, None)

    def enqueued(self, sub: Subscription, requeue: Requeue) -> None:
        """`sub`'s request is on its queue; `requeue` queues it again. If the connection
        was lost since it was opened, the check after the reconnect may have missed it (it
        was being enqueued): it is checked now."""
        sub.requeue = requeue
        if sub.opened_in != self.incidents and self._ready.is_set():
            self._lost.check([sub])

    @property
    def ready(self) -> bool:
        """Subscribed: a worker's frames reach this gateway (`/health` says so)."""
        return self._ready.is_set()

    @property
    def active(self) -> int:
        return len(self._subs)

    async def worker_alive(self, worker_id: str) -> bool:
        try:
            return bool(await self._redis.exists(redis_keys.worker_key(worker_id)))
        except RedisError:
            return True  # Redis trouble is reported by the reader, not blamed on the worker

    async def _read_forever(self) -> None:
        backoff = 0.1
        while True:
            try:
                await self._read_once()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, TimeoutError) as exc:
                if self._ready.is_set():  # it was up: a new incident, not a retry
                    backoff = 0.1
                    self.incidents += 1
                self._ready.clear()  # new requests wait for the next subscribe
                log.warning("gateway=%s pub/sub connection lost: %r", self.gateway_id, exc)
                # Frames may have been lost while disconnected: end what had started. A
                # request still queued has lost nothing (its worker sends START again
                # until someone listens), so it goes on waiting, its deadline the bound.
                self._fail_started(StreamBroken("Lost the connection to Redis mid-stream."))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RECONNECT_MAX_S)

    async def _read_once(self) -> None:
        conn: PubSubConnection | None = None
        try:
            async with asyncio.timeout(SUBSCRIBE_TIMEOUT_S):  # a dead peer never answers
                url = await self._target.master_url()
                conn = await PubSubConnection.open(url, self._on_message)
                await conn.psubscribe(redis_keys.channel_pattern(self.gateway_id))
                await conn.subscribe(redis_keys.KEYS_CHANGED)
            self._keys_changed()  # notes may have been missed while disconnected
            self._ready.set()
            if self.incidents:  # a broker that failed over or restarted may have lost some
                self._lost.check(list(self._subs.values()))
            log.info("gateway=%s pub/sub subscribed at %s", self.gateway_id, _host_of(url))
            await conn.run()
        finally:
            if conn is not None:
                conn.close()

    def _on_message(self, channel: bytes, data: bytes) -> None:
        if channel == _KEYS_CHANGED:  # the only plain channel
            self._keys_changed()
        else:
            self._route(channel, data)

    def _route(self, channel: bytes | str, data: bytes | str) -> None:
        sub = self._subs.get(redis_keys.request_id_of(redis_keys.text(channel)))
        if sub is None:
            return  # the client left; the worker notices through its cancel key
        try:
            sub.deliver(Frame.model_validate_json(data))
        except ValueError:
            sub.deliver(StreamBroken("Received a malformed frame from the worker."))

    def _fail_started(self, err: CorralError) -> None:
        for sub in list(self._subs.values()):
            if sub.worker is not None:
                sub.deliver(err)

    def fail_all(self, err: CorralError) -> None:
        """End every open request with `err` (a stream: one error event; else its reply)."""
        self._fail_all(err)

    def _fail_all(self, err: CorralError) -> None:
        for sub in list(self._subs.values()):
            sub.deliver(err)


def _host_of(url: str) -> str:
    """`host:port` of a Redis URL, for a log line (never its password)."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}" if parts.hostname else parts.path

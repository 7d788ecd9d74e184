"""Step 5 of the request path: frames from a running task onto the request's pub/sub channel.

A frame is taken from the publisher's buffer and sent under one lock, which also guards
the sequence counter, so frames can never be reordered. Chunks arriving faster than
`interval` are batched into one frame, which a flusher thread sends when it is due; a
chunk after a quiet spell (the first token, above all) and the ACCEPTED frame are sent at
once by the task thread that read them, so batching never delays them, nor does waking
the flusher.

Each PUBLISH is pipelined with an `EXISTS` of the request's cancel key, so noticing a
cancel costs no extra round trip while tokens flow; when the stream is quiet (a long
prompt being processed) the thread polls the key on its own. A PUBLISH that reached no
subscriber means the gateway that owned the request is gone: that cancels too.

A stream sends its frames on a connection it holds from its first frame to its last,
writing the two commands and reading the two replies itself: at a few tens of tokens a
second each token is a frame, and redis-py's `Pipeline` cost more than the frame (a pooled
connection taken and given back, its checks and hooks, every time). On any error the
connection is dropped and that frame goes through a `Pipeline`, with the client's retries
(a broker restarting); the final frame always does (it carries the record's end).

Flusher threads outlive their stream: the next request's publisher takes an idle one.
Starting a thread made the task wait right before its llama-server call (longer on busy
cores), because `Thread.start` blocks until the new thread runs. They are
daemon threads, not a ThreadPoolExecutor's: those are joined at interpreter exit, so a
stream that never finished would hang a pool child's exit.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from redis.connection import Connection

from common.frames import Frame, FrameType

log = logging.getLogger(__name__)

CANCEL_POLL_S = 0.02  # how often a quiet stream checks its cancel key
LISTENER_WAIT_S = 10.0  # a START nobody hears is sent again this long (a gateway reconnecting)
LISTENER_RETRY_S = 0.1

Inbox = queue.SimpleQueue[tuple[Callable[[], None], threading.Event]]
_idle: list[Inbox] = []  # inboxes of the flusher threads waiting for a stream
_idle_lock = threading.Lock()


def _spawn(run: Callable[[], None], done: threading.Event) -> None:
    """Run `run` on an idle flusher thread, or a new one when all are busy; `done` is set
    when it returned."""
    with _idle_lock:
        inbox = _idle.pop() if _idle else None
    if inbox is None:
        inbox = queue.SimpleQueue()
        threading.Thread(
            target=_run_sends, args=(inbox,), name="corral-publisher", daemon=True
        ).start()
    inbox.put((run, done))


def _run_sends(inbox: Inbox) -> None:
    while True:
        run, done = inbox.get()
        try:
            run()
        except Exception:  # a stream's failure must not take the thread with it
            log.exception("publisher flusher failed")
        except BaseException:  # the thread ends: never idle again
            done.set()
            raise
        with _idle_lock:  # idle again before `done`: the task's next stream reuses it
            _idle.append(inbox)
        done.set()


def _forget_threads() -> None:
    """A forked child (a Celery pool child) inherits the list but not the threads."""
    global _idle_lock
    _idle.clear()
    _idle_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_threads)


class Publisher:
    def __init__(
        self,
        client: redis.Redis,
        channel: str,
        cancel_key: str,
        worker_id: str,
        *,
        interval: float = 0.01,
        on_cancel: Callable[[], None] | None = None,
    ) -> None:
        self._redis = client
        self._channel = channel
        self._cancel_key = cancel_key
        self._worker_id = worker_id
        self._interval = interval
        self._on_cancel = on_cancel
        self._cond = threading.Condition()  # guards what waits to be sent
        self._send_lock = threading.Lock()  # held from taking a frame until it is sent
        self._chunks: list[str] = []
        self._accepted = False  # an ACCEPTED frame is due (sent before any chunk)
        self._final: Frame | None = None
        self._also: Callable[[redis.client.Pipeline], None] | None = None
        self._seq = 0
        self._last_flush = 0.0  # paces batching: when chunks last went out
        self._last_check = 0.0  # paces cancel polls
        self.cancelled = False
        self.first_chunk_at: float | None = None  # epoch s the first chunk was queued
        self._started = False
        self._done = threading.Event()
        self._conn: Connection | None = None  # the stream's own, used under the send lock

    # -- called from the task thread ------------------------------------------------
    def start(self) -> None:
        """Announce the worker (the gateway watches its heartbeat) and start flushing, on a
        flusher thread. The task calls this once its llama-server request is on the wire:
        started earlier, the thread's first PUBLISH competed with the request for the GIL;
        chunks that come before it wait in the batch. Idempotent."""
        if not self._started:
            self._started = True
            _spawn(self._run, self._done)

    def accepted(self) -> None:
        """llama-server answered 200: tell the gateway, which starts its reply. Sent by the
        caller itself, like a first chunk, unless the flusher is sending (START)."""
        with self._cond:
            self._accepted = True
            if self._seq == 0 or not self._send_lock.acquire(blocking=False):
                self._cond.notify()  # START first: the flusher sends both in order
                return
        self._send_taken()

    def chunk(self, *raw: str) -> None:
        """Queue chunks for the next frame; several given at once share a frame. A chunk
        after a quiet spell is sent at once by the caller itself, rather than by waking
        the flusher (a thread wake-up on every first token)."""
        if self.first_chunk_at is None:
            self.first_chunk_at = time.time()
        with self._cond:
            fresh = not self._chunks
            self._chunks.extend(raw)
            if not fresh or not self._chunks:
                return  # the batch is already due to go: these join it
            quiet = (
                self._seq > 0
                and not self._accepted
                and time.monotonic() >= self._last_flush + self._interval
            )
            if not quiet or not self._send_lock.acquire(blocking=False):
                self._cond.notify()  # only a new batch wakes the flusher, so the chunks
                return  # after it gather until the batch is due
        self._send_taken()

    def _send_taken(self) -> None:
        """Take the next frame and send it; called with the send lock, which it releases."""
        try:
            frame = self._take()
            if frame is not None:
                self._send(frame)
        finally:
            self._send_lock.release()

    def finish(
        self,
        frame_type: FrameType,
        *,
        also: Callable[[redis.client.Pipeline], None] | None = None,
        **fields: Any,
    ) -> None:
        """Queue the final frame after any pending chunks, and wait until it is sent.
        `also` adds commands to the final frame's round trip (the record's end)."""
        self.start()  # the call may have failed before its request went out
        with self._cond:
            self._also = also
            self._final = Frame(seq=-1, type=frame_type, **fields)
            self._cond.notify()
        self._done.wait()

    # -- the flusher thread -----------------------------------------------------------
    def _run(self) -> None:
        try:
            with self._send_lock:
                self._send_start()
            while True:
                if not self._wait_until_due():  # a quiet spell
                    self._poll_cancel()
                    continue
                with self._send_lock:
                    frame = self._take()  # None if the task thread sent it meanwhile
                    if frame is not None:
                        self._send(frame)
                if frame is not None and frame.final:
                    return
        finally:
            with self._send_lock:
                self._release(broken=False)

    def _wait_until_due(self) -> bool:
        """Wait until a frame is due: ACCEPTED or the final frame at once, chunks once
        `interval` has passed since chunks last went out (a batch gathers meanwhile).
        False if all stayed quiet for CANCEL_POLL_S."""
        with self._cond:
            if not (self._accepted or self._chunks or self._final):
                self._cond.wait(timeout=CANCEL_POLL_S)
            due = self._last_flush + self._interval
            while (
                self._chunks
                and not self._accepted
                and self._final is None
                and (wait := due - time.monotonic()) > 0
            ):
                self._cond.wait(timeout=wait)  # woken early by accepted() or finish()
            return bool(self._accepted or self._chunks or self._final)

    def _take(self) -> Frame | None:
        """The next frame, in order: ACCEPTED, then the chunks, then the final frame.
        Called with the send lock held, so frames go out in the order they are taken."""
        with self._cond:
            if self._accepted:
                self._accepted = False
                return Frame(seq=0, type=FrameType.ACCEPTED)
            if self._chunks:
                chunks, self._chunks = self._chunks, []
                return Frame(seq=0, type=FrameType.CHUNKS, chunks=chunks)
            return self._final

    def _send_start(self) -> None:
        """START, sent again while nobody listens, for `LISTENER_WAIT_S` at most: a gateway
        that just got the broker back (it restarted) subscribes again within seconds, and
        the request it waits for must not be given up meanwhile. Past that, its gateway is
        gone: the stream cancels itself, as for any frame nobody hears."""
        start = Frame(seq=0, type=FrameType.START, worker=self._worker_id).model_dump_json(
            exclude_defaults=True
        )
        deadline = time.monotonic() + LISTENER_WAIT_S
        while True:
            try:
                receivers, cancelled = self._publish(start)
            except redis.RedisError as exc:
                log.warning("publish failed channel=%s: %r", self._channel, exc)
                receivers, cancelled = 0, 0
            if receivers or cancelled or time.monotonic() >= deadline:
                break
            time.sleep(LISTENER_RETRY_S)
        self._seq = 1
        self._last_check = time.monotonic()
        if cancelled or not receivers:
            self._cancel("cancel key set" if cancelled else "no listener")

    def _send(self, frame: Frame) -> None:
        frame.seq = self._seq
        self._seq += 1
        payload = frame.model_dump_json(exclude_defaults=True)
        try:
            if frame.final:
                receivers, cancelled = self._publish_piped(payload, self._also)
            else:
                receivers, cancelled = self._publish(payload)
        except redis.RedisError as exc:
            log.warning("publish failed channel=%s: %r", self._channel, exc)
            receivers, cancelled = 0, 1
        self._last_check = time.monotonic()
        if frame.type is FrameType.CHUNKS:
            self._last_flush = self._last_check
        if (receivers == 0 or cancelled) and not frame.final:
            self._cancel("no listener" if receivers == 0 else "cancel key set")

    def _publish(self, payload: str) -> tuple[int, int]:
        """PUBLISH and EXISTS in one round trip on the stream's own connection: (receivers,
        cancelled). Called with the send lock held."""
        try:
            if self._conn is None:
                self._conn = self._redis.connection_pool.get_connection()
            conn = self._conn
            conn.send_packed_command(
                conn.pack_commands(
                    [("PUBLISH", self._channel, payload), ("EXISTS", self._cancel_key)]
                )
            )
            return int(conn.read_response()), int(conn.read_response())
        except (redis.RedisError, OSError) as exc:  # its replies unread: the connection goes
            log.info("publish retried on a new connection channel=%s: %r", self._channel, exc)
            self._release(broken=True)
        return self._publish_piped(payload, None)

    def _publish_piped(
        self, payload: str, also: Callable[[redis.client.Pipeline], None] | None
    ) -> tuple[int, int]:
        pipe = self._redis.pipeline(transaction=False)
        pipe.publish(self._channel, payload)
        pipe.exists(self._cancel_key)
        if also is not None:
            also(pipe)
        receivers, cancelled, *_ = pipe.execute()
        return int(receivers), int(cancelled)

    def _release(self, *, broken: bool) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if broken:
            conn.disconnect()
        self._redis.connection_pool.release(conn)

    def _poll_cancel(self) -> None:
        if self.cancelled or time.monotonic() - self._last_check < CANCEL_POLL_S:
            return
        try:
            found = self._redis.exists(self._cancel_key)
        except redis.RedisError:
            return
        self._last_check = time.monotonic()
        if found:
            self._cancel("cancel key set")

    def _cancel(self, why: str) -> None:
        if self.cancelled:
            return
        self.cancelled = True
        log.info("stream cancelled channel=%s reason=%s", self._channel, why)
        if self._on_cancel is not None:
            self._on_cancel()

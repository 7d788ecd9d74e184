"""The worker's broker transport: kombu's Redis transport, with its ack bookkeeping written
to Redis without waiting for the reply.

With late ack, kombu keeps every task a worker holds in two Redis structures (the unacked
hash and its index) until the task is acked, so that a task whose worker dies is delivered
again (`visibility_timeout`). Stock kombu writes them with a blocking `MULTI … EXEC` round
trip twice per task, and both lie on a path users wait on:

- `append` runs between BRPOP and the pool's write to a child, so every task's first
  token waited for it;
- `ack` runs between a task's end and the next BRPOP (prefetch 1 holds the fetch until the
  ack is done), so every hand-off between two tasks waited for it, and a high-priority
  request waiting for a slot waited that much longer.

This QoS sends the same writes, as one script each (atomic like the transaction, and one
reply to read), on a connection of its own, and reads the replies on its next write (they
have long arrived by then) or before anything reads the structures back (reject, restore,
close). Nothing is weaker: a write reaches the socket before the task reaches the pool,
exactly where the stock write would have completed, and a worker killed after that point
leaves it to Redis all the same (the kernel delivers what was written). A write that
cannot be sent falls back to kombu's blocking path; one whose reply shows a failure, or
whose fate a broken connection hides, is written again with it.

Selected by `broker_transport` in `workers.consumer.celery_app.configure_app`, for
`redis://` and (`SentinelTransport`) `sentinel://` URLs.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from time import time
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.json import dumps

log = logging.getLogger(__name__)


# Each write is one script (atomic, like kombu's MULTI … EXEC, and one reply to read).
# KEYS: the unacked index, the unacked hash.
_APPEND_LUA = """
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return 1
"""  # ARGV: time, delivery tag, the message as kombu stores it
_ACK_LUA = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
"""  # ARGV: delivery tag
_SHA = {lua: hashlib.sha1(lua.encode()).hexdigest() for lua in (_APPEND_LUA, _ACK_LUA)}

Write = tuple[str, list[Any]]  # a script and its KEYS + ARGV


class QoS(kombu_redis.QoS):
    """kombu's Redis QoS, with `append` and `ack` sent without waiting (module docstring)."""

    _conn: redis.Connection | None = None  # this QoS's own connection, once it has written
    _conn_pool: Any = None  # the pool `_conn` came from (the channel may have dropped it)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._unconfirmed: list[Write] = []  # sent on `_conn`, reply not read yet

    def append(self, message: Any, delivery_tag: str) -> None:
        delivery = message.delivery_info
        raw = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
        keys_ = [self.unacked_index_key, self.unacked_key]
        if not self._send((_APPEND_LUA, [*keys_, time(), delivery_tag, raw])):
            super().append(message, delivery_tag)
            return
        virtual.QoS.append(self, message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        if self._connection_lost(delivery_tag, "ack"):
            virtual.QoS.ack(self, delivery_tag)
            return
        if not self._send((_ACK_LUA, [self.unacked_index_key, self.unacked_key, delivery_tag])):
            super().ack(delivery_tag)
            return
        virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if self._connection_lost(delivery_tag, "reject"):
            virtual.QoS.ack(self, delivery_tag)
            return
        self.collect()  # a requeue reads the unacked hash back: our writes first
        super().reject(delivery_tag, requeue=requeue)

    def restore_unacked(self, client: Any = None) -> Any:
        self.collect()
        return super().restore_unacked(client)

    def _connection_lost(self, delivery_tag: str, what: str) -> bool:
        """Whether kombu let go of this channel's transport: the broker connection was lost
        and Celery goes on with a new one, while a task fetched on this one ends. Nothing
        can be written through it; kombu's own path would fail for want of an address and
        stop the worker's consumer for good. The task stays in the unacked hash, where
        `visibility_timeout` brings it back, and its claim keeps it from running twice."""
        if not _transport_gone(self.channel):
            return False
        log.warning("broker connection lost: %s of delivery %s not written", what, delivery_tag)
        return True

    def _send(self, write: Write) -> bool:
        """Send `write`; False if it could not be sent."""
        if self.channel.global_keyprefix:  # keys need kombu's prefixing client: its path
            return False
        lua, keys_and_args = write
        try:
            self.collect()
            conn = self._connection()
            conn.send_command("EVALSHA", _SHA[lua], 2, *keys_and_args, check_health=False)
        except (redis.RedisError, OSError) as exc:
            log.warning("broker bookkeeping write failed, using the blocking path: %r", exc)
            self._drop()
            return False
        self._unconfirmed.append(write)
        return True

    def _connection(self) -> redis.Connection:
        """Our connection, with the scripts loaded; a new one if Redis closed it (idle
        timeout, restart), which shows as something to read while Redis owes us nothing."""
        conn = self._conn
        if conn is not None:
            try:
                if not conn.can_read(timeout=0):
                    return conn
            except (redis.RedisError, OSError):
                pass
            self._drop()
        pool = self._conn_pool = self.channel.pool
        conn = self._conn = pool.get_connection()
        for lua in _SHA:  # once per connection (and again after a restart lost them)
            conn.send_command("SCRIPT", "LOAD", lua)
            conn.read_response()
        return conn

    def collect(self) -> None:
        """Read the replies Redis owes us. If a write failed, or its fate is unknown (the
        connection broke), write everything not yet confirmed again, in order, with a
        blocking round trip: the writes are idempotent, so the end state is right."""
        conn, writes = self._conn, self._unconfirmed
        if conn is None or not writes:
            return
        self._unconfirmed = []
        try:
            for _ in writes:
                conn.read_response()  # raises on an error reply
        except (redis.RedisError, OSError) as exc:
            log.warning("broker bookkeeping write failed (%r); writing %d again", exc, len(writes))
            self._drop()
            self._write_blocking(writes)

    def _write_blocking(self, writes: list[Write]) -> None:
        if _transport_gone(self.channel):  # see `QoS._connection_lost`
            log.warning("broker connection lost: %d bookkeeping writes not written", len(writes))
            return
        with self.channel.conn_or_acquire() as client:
            pipe = client.pipeline()
            for lua, keys_and_args in writes:
                pipe.eval(lua, 2, *keys_and_args)
            pipe.execute()

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        pool, self._conn_pool = self._conn_pool, None
        if conn is not None:
            conn.disconnect()
            pool.release(conn)  # taken with `get_connection`: give it back


def _transport_gone(channel: Any) -> bool:
    """Whether kombu has let go of `channel`'s transport (or the transport of its client)."""
    transport = channel.connection
    return transport is None or transport.client is None


class Listening:
    """The queues of each channel's latest BRPOP, for the model manager's thread: a queue
    the consumer was told to take is being listened to only once a BRPOP of the consumer's
    channel names it (the one in flight when it was told names the old set until it times
    out). The consumer's channel is the one whose BRPOPs name the worker's private queue
    (`anchor`); others (an `inspect()` reply queue) do not count."""

    def __init__(self) -> None:
        self._latest: dict[int, frozenset[str]] = {}  # id(channel) -> its latest BRPOP's
        self._cond = threading.Condition()

    def note(self, channel: object, queues: frozenset[str]) -> None:
        with self._cond:
            self._latest[id(channel)] = queues
            self._cond.notify_all()

    def forget(self, channel: object) -> None:
        with self._cond:
            self._latest.pop(id(channel), None)

    @property
    def active(self) -> bool:
        """Whether this transport is the one in use (else kombu's own: TLS, Sentinel)."""
        return bool(self._latest)

    def wait(self, anchor: str, add: set[str], remove: set[str], timeout: float) -> bool:
        """Until a BRPOP of the consumer's channel names all of `add` and none of `remove`."""

        def done() -> bool:
            return any(anchor in q and add <= q and not remove & q for q in self._latest.values())

        with self._cond:
            return self._cond.wait_for(done, timeout)


LISTENING = Listening()


class Channel(kombu_redis.Channel):
    QoS = QoS
    _sync_client: redis.Redis | None = None  # the client `conn_or_acquire` hands out

    def _brpop_start(self, timeout: float | None = None) -> None:
        super()._brpop_start(timeout)
        if self._in_poll:
            LISTENING.note(self, frozenset(self.active_queues))

    @contextmanager
    def conn_or_acquire(self, client: redis.Redis | None = None) -> Iterator[redis.Redis]:
        """kombu builds a new `redis.Redis` for each command it sends outside BRPOP (the
        PUBLISH of every batch of task events, twice per task), the constructor filling a
        table of reply callbacks each time, in the consumer's loop,
        which hands tasks to the pool. A client holds nothing but its pool, so one serves
        every command while that pool lives (kombu replaces it on reconnect)."""
        if client:
            yield client
            return
        cached = self._sync_client
        if cached is None or cached.connection_pool is not self.pool:
            cached = self._sync_client = self._create_client()
        yield cached

    def close(self) -> None:
        """Read what Redis owes first: a socket closed with unread replies is reset, and a
        reset right after the last ack's write could beat that write to Redis. A broker
        already gone cannot take them (the same writes go with it in kombu's own path): the
        channel closes all the same, or it would be closed later, from a connection kombu
        has already detached, and that error stops the worker's consumer for good."""
        if isinstance(self._qos, QoS):
            try:
                self._qos.collect()
            except Exception as exc:
                log.warning("broker bookkeeping not written as the channel closed: %r", exc)
        LISTENING.forget(self)
        if _transport_gone(self):
            # kombu detached the transport before this close (a lost broker: an earlier
            # close failed on the dead socket): restoring the unacked tasks now would fail
            # for want of an address and stop the consumer for good. They stay in Redis'
            # unacked hash, where `visibility_timeout` brings them back.
            self.do_restore = False
        super().close()
        # kombu disconnects its pools and only then restores what is still unacked, which
        # opens new connections in a new pool that nobody closes: close that one too.
        self._disconnect_pools()


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelChannel(Channel, kombu_redis.SentinelChannel):
    """The same channel through Redis Sentinel: kombu's Sentinel channel finds the master
    for each new connection, this QoS's own included."""


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel

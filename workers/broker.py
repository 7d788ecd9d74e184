"""The worker's broker transport: kombu's Redis transport, with its ack bookkeeping written
to Redis without waiting for the reply.

With late ack, kombu keeps every task a worker holds in two Redis structures (the unacked
hash and its index) until the task is acked, so that a task whose worker dies is delivered
again (`visibility_timeout`). Stock kombu writes them with a blocking `MULTI … EXEC` round
trip twice per task, and both lie on a path users wait on:

- `append` runs between BRPOP and the pool's write to a child, so every task's first
  token waited for it (~0.7 ms here);
- `ack` runs between a task's end and the next BRPOP (prefetch 1 holds the fetch until the
  ack is done), so every hand-off between two tasks waited for it, and a high-priority
  request waiting for a slot waited that much longer.

This QoS sends the same transaction on a connection of its own and reads the replies on its
next write (they have long arrived by then) or before anything reads the structures back
(reject, restore). Nothing is weaker: the commands reach the socket before the task reaches
the pool, exactly where the stock write would have completed, and a worker killed after
that point leaves them to Redis all the same (the kernel delivers what was written; a
transaction cut short is discarded whole, as before). A write that cannot be sent falls back
to kombu's blocking path, so a broken connection behaves as stock kombu does.

Selected by `broker_transport` in `workers.celery_app.configure_app`.
"""

from __future__ import annotations

import logging
from time import time
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.json import dumps

log = logging.getLogger(__name__)


class QoS(kombu_redis.QoS):
    """kombu's Redis QoS, with `append` and `ack` sent without waiting (module docstring)."""

    _conn: redis.Connection | None = None  # this QoS's own connection, once it has written

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._unconfirmed: list[list[tuple[Any, ...]]] = []  # sent on `_conn`, not yet read

    def append(self, message: Any, delivery_tag: str) -> None:
        delivery = message.delivery_info
        raw = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
        if not self._send(
            ("ZADD", self.unacked_index_key, time(), delivery_tag),
            ("HSET", self.unacked_key, delivery_tag, raw),
        ):
            super().append(message, delivery_tag)
            return
        virtual.QoS.append(self, message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        if not self._send(
            ("ZREM", self.unacked_index_key, delivery_tag),
            ("HDEL", self.unacked_key, delivery_tag),
        ):
            super().ack(delivery_tag)
            return
        virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        self.collect()  # a requeue reads the unacked hash back: our writes first
        super().reject(delivery_tag, requeue=requeue)

    def restore_unacked(self, client: Any = None) -> Any:
        self.collect()
        return super().restore_unacked(client)

    def _send(self, *commands: tuple[Any, ...]) -> bool:
        """Write `commands` as one transaction; False if it could not be written."""
        if self.channel.global_keyprefix:  # keys need kombu's prefixing client: its path
            return False
        batch = [("MULTI",), *commands, ("EXEC",)]
        try:
            self.collect()
            conn = self._connection()
            conn.send_packed_command(conn.pack_commands(batch), check_health=False)
        except (redis.RedisError, OSError) as exc:
            log.warning("broker bookkeeping write failed, using the blocking path: %r", exc)
            self._drop()
            return False
        self._unconfirmed.append(batch)
        return True

    def _connection(self) -> redis.Connection:
        """Our connection; a new one if Redis closed it (idle timeout, restart), which shows
        as something to read while Redis owes us nothing."""
        conn = self._conn
        if conn is not None:
            try:
                if not conn.can_read(timeout=0):
                    return conn
            except (redis.RedisError, OSError):
                pass
            self._drop()
        conn = self._conn = self.channel.pool.get_connection()
        return conn

    def collect(self) -> None:
        """Read the replies Redis owes us. If a write failed, or its fate is unknown (the
        connection broke), write everything not yet confirmed again, in order, with a
        blocking round trip: the commands are idempotent, so the end state is right."""
        conn, batches = self._conn, self._unconfirmed
        if conn is None or not batches:
            return
        self._unconfirmed = []
        try:
            for batch in batches:
                for _ in batch[:-1]:
                    conn.read_response()  # +OK, +QUEUED …; raises on an error reply
                failed = [r for r in conn.read_response() if isinstance(r, Exception)]
                if failed:
                    raise failed[0]
        except (redis.RedisError, OSError) as exc:
            log.warning("broker bookkeeping write failed (%r); writing %d again",
                        exc, len(batches))  # fmt: skip
            self._drop()
            self._write_blocking(batches)

    def _write_blocking(self, batches: list[list[tuple[Any, ...]]]) -> None:
        with self.channel.conn_or_acquire() as client:
            pipe = client.pipeline()
            for batch in batches:
                for command in batch[1:-1]:
                    pipe.execute_command(*command)
            pipe.execute()

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.disconnect()


class Channel(kombu_redis.Channel):
    QoS = QoS

    def close(self) -> None:
        """Read what Redis owes first: a socket closed with unread replies is reset, and a
        reset right after the last ack's write could beat that write to Redis."""
        if isinstance(self._qos, QoS):
            self._qos.collect()
        super().close()


class Transport(kombu_redis.Transport):
    Channel = Channel

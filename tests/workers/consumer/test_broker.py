"""The worker's broker transport on a real Valkey: a delivered message is recorded as
unacked (so a dead worker's task is delivered again), an ack removes it, a requeue puts it
back in its queue, and a write that cannot be sent falls back to kombu's blocking path.

It runs in a database of its own: kombu's unacked hash has one name per database."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.message import Message

from corral.redis_server import EmbeddedRedis
from workers.consumer import broker

DB = 9
QUEUE = Queue("broker-test", Exchange("broker-test"), routing_key="broker-test")


@pytest.fixture
def url(redis_server: EmbeddedRedis) -> str:
    return redis_server.url.rsplit("/", 1)[0] + f"/{DB}"


@pytest.fixture
def r(url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def conn(url: str, r: redis.Redis) -> Iterator[Connection]:
    with Connection(url, transport="workers.consumer.broker:Transport") as c:
        yield c


def _deliver(conn: Connection, body: dict[str, Any]) -> tuple[Message, broker.QoS]:
    """Publish `body`, then take it with late ack as a worker does; the message and the QoS."""
    Producer(conn.default_channel).publish(
        body, exchange=QUEUE.exchange, routing_key="broker-test", declare=[QUEUE]
    )
    got: list[Message] = []
    consumer = Consumer(conn.channel(), [QUEUE], callbacks=[lambda _b, m: got.append(m)])
    consumer.qos(prefetch_count=1)
    with consumer:
        conn.drain_events(timeout=5)
    (message,) = got
    qos = message.channel.qos
    assert isinstance(qos, broker.QoS)
    return message, qos


def _unacked(r: redis.Redis) -> tuple[dict[bytes, bytes], list[bytes]]:
    return r.hgetall("unacked"), r.zrange("unacked_index", 0, -1)  # type: ignore[return-value]


def test_delivered_message_is_recorded_unacked_then_removed_by_ack(
    conn: Connection, r: redis.Redis
) -> None:
    message, qos = _deliver(conn, {"n": 1})
    qos.collect()  # the replies: what Redis did is settled now
    table, index = _unacked(r)
    tag = message.delivery_tag.encode()
    assert list(table) == [tag] and index == [tag]
    raw, exchange, routing_key = json.loads(table[tag])  # all it takes to deliver it again
    assert base64.b64decode(raw["body"]) == b'{"n": 1}'
    assert exchange == routing_key == "broker-test"
    message.ack()
    qos.collect()
    assert _unacked(r) == ({}, [])


def test_requeue_puts_the_message_back(conn: Connection, r: redis.Redis) -> None:
    message, _ = _deliver(conn, {"n": 2})
    message.requeue()  # reject(requeue=True) reads the unacked hash back
    assert r.llen("broker-test") == 1
    assert _unacked(r) == ({}, [])


def test_a_connection_redis_closed_is_replaced(
    conn: Connection, r: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    message, qos = _deliver(conn, {"n": 3})
    qos.collect()
    r.client_kill_filter(_type="normal", skipme=True)  # as an idle timeout or restart would
    message.ack()
    qos.collect()
    assert _unacked(r) == ({}, [])
    assert "broker bookkeeping" not in caplog.text  # seen before writing, not lost after


def test_writes_whose_fate_is_unknown_are_written_again(
    conn: Connection, r: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    message, qos = _deliver(conn, {"n": 4})
    assert qos._conn is not None
    qos._conn.disconnect()  # the append's replies are lost with the connection
    qos.collect()
    assert "writing 1 again" in caplog.text
    assert len(_unacked(r)[0]) == 1
    message.ack()
    qos.collect()
    assert _unacked(r) == ({}, [])


def test_a_write_redis_refused_is_written_again(
    conn: Connection, r: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    message, qos = _deliver(conn, {"n": 5})
    qos.collect()
    r.script_flush()  # the ack's script is gone: Redis answers NOSCRIPT
    message.ack()
    qos.collect()
    assert "writing 1 again" in caplog.text
    assert _unacked(r) == ({}, [])


def test_what_a_dead_worker_left_unacked_is_delivered_again(url: str, r: redis.Redis) -> None:
    """kombu's own restore (any worker runs it, after `visibility_timeout`) reads back what
    our append wrote: the message returns to its queue, whole."""
    with Connection(url, transport="workers.consumer.broker:Transport") as first:
        _, qos = _deliver(first, {"n": 6})
        qos.collect()
        qos.restore_at_shutdown = False  # killed: no ack, and no restore at shutdown
    assert r.llen("broker-test") == 0 and len(_unacked(r)[0]) == 1
    options = {"visibility_timeout": 0}
    with Connection(
        url, transport="workers.consumer.broker:Transport", transport_options=options
    ) as c:
        c.default_channel.qos.restore_visible()
        assert r.llen("broker-test") == 1
        assert _unacked(r) == ({}, [])
        message, _ = _deliver(c, {"n": 7})  # the restored one comes first (BRPOP)
        assert message.payload == {"n": 6} and message.delivery_info["redelivered"]


def test_fanout_publishes_share_one_client_until_the_pool_is_replaced(
    conn: Connection, r: redis.Redis
) -> None:
    """Task events go out as fanout PUBLISHes; each one built a new redis client in stock
    kombu. They still arrive, through one client, and a reconnect's new pool gets a new one."""
    events = Exchange("broker-test-ev", type="fanout")
    channel = conn.default_channel
    assert isinstance(channel, broker.Channel)
    listener = r.pubsub()
    listener.psubscribe("*broker-test-ev*")
    listener.get_message(timeout=5)  # the subscription's confirmation
    producer = Producer(channel, exchange=events)
    producer.publish({"n": 1}, declare=[events])
    first = channel._sync_client
    producer.publish({"n": 2})
    assert first is not None and channel._sync_client is first
    channel._disconnect_pools()  # what kombu does when the connection is lost
    producer.publish({"n": 3})
    assert channel._sync_client is not first
    assert channel._sync_client.connection_pool is channel.pool
    got: list[Any] = []
    while len(got) < 3 and (msg := listener.get_message(timeout=5)) is not None:
        if msg["type"] == "pmessage":
            got.append(json.loads(base64.b64decode(json.loads(msg["data"])["body"])))
    listener.close()
    assert got == [{"n": 1}, {"n": 2}, {"n": 3}]

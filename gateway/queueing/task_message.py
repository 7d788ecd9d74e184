"""Celery task messages built by hand, so the gateway can enqueue in one Redis round trip.

`celery.send_task` blocks (a thread hop off the event loop), then LPUSHes through kombu and
PUBLISHes a `task-sent` event, all on every request's path to its first token. Here the
gateway builds the very Redis list entry kombu's Redis transport would LPUSH, and pushes
it itself, inside the same script that checks the queue depth and writes the request's
record (`gateway.queueing.dispatch`). The task message is Celery's own (`app.amqp.as_task_v2`);
only kombu's envelope around it (`Producer.publish` → `Channel.basic_publish` → `_put`)
is re-done here, for the one case we publish: a priority-0 message on a direct queue, with
Celery's JSON serializer and the transport's default base64 body encoding.
`tests/gateway/queueing/test_task_message.py` compares our entry with what `send_task` writes, so a
kombu or Celery upgrade that changes the envelope fails a test, not production. Code that
reads or rewrites a queued entry (positions, aging) goes through `task_body` here too.

The `task-sent` event (what Flower lists queued tasks from) is built here too, as the
PUBLISH kombu would send on Celery's event exchange; the gateway sends it right after the
enqueue. Sent with Celery's own dispatcher on a thread, it delayed the first token, the
thread holding the GIL just as the event loop needed it.

A task's `argsrepr` (what Flower and worker logs show as its arguments) is a one-line
summary of the request rather than Celery's `saferepr` of the whole body: the prompt is
not something to display, and `saferepr` of a long body is slow (the costs of all three are
in `benchmarks/README.md`, "Costs behind the code").
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from celery import Celery
from celery.events import Event
from celery.utils.nodenames import anon_nodename
from celery.utils.time import utcoffset
from kombu import Connection
from kombu.compression import compress
from kombu.entity import maybe_delivery_mode
from kombu.serialization import dumps as serialize
from kombu.transport.redis import Channel as RedisChannel
from kombu.transport.virtual.base import Base64
from kombu.utils.json import dumps as json_dumps
from kombu.utils.json import loads as json_loads
from kombu.utils.uuid import uuid

from common import redis_keys
from common.jobs import Job

_BASE64 = Base64()


@dataclass(frozen=True)
class Route:
    """Where a queue's messages go in Redis, and the exchange binding kombu keeps for it.

    A message kombu restores after the visibility timeout is routed again from its
    `delivery_info` (through `_kombu.binding.<exchange>` for a named exchange), so the
    enqueue also (re)adds the binding `send_task` would have declared."""

    queue: str
    list_key: str  # a priority-0 message goes to the list named after the queue itself
    exchange: str  # "" (the anonymous exchange): Celery routes direct queues that way
    routing_key: str
    delivery_mode: int
    binding_key: str  # `_kombu.binding.<exchange>`: the queue's binding table
    permanent_key: str  # `_kombu.binding_permanent.<exchange>`: keeps the table from sweeps
    binding: str  # the table's member: routing key, pattern, queue


@dataclass(frozen=True)
class Publish:
    channel: str
    payload: str


@dataclass(frozen=True)
class TaskMessage:
    route: Route
    entry: str  # the JSON string to LPUSH on `route.list_key`
    sent_fields: dict[str, Any] | None  # Celery's `task-sent` event's fields; None: not wanted


class TaskMessages:
    """Builds `redis_keys.INFER_TASK` messages for one Celery app (its config decides the
    serializer, compression, delivery mode, queues and whether `task-sent` is sent)."""

    def __init__(self, app: Celery) -> None:
        options = app.conf.broker_transport_options or {}
        if options.get("global_keyprefix") or options.get("body_encoding", "base64") != "base64":
            raise ValueError(f"transport options not supported by {__name__}: {options}")
        self._app = app
        self._routes: dict[str, Route] = {}
        self._hostname = anon_nodename()  # what Celery's own dispatcher calls a client
        self._event_exchange = _event_exchange_topic(app, options)
        self._event_patterns = options.get("fanout_patterns", True)
        conf = app.conf  # read once: each lookup walks Celery's layered config
        self._serializer = conf.task_serializer
        self._compression = conf.task_compression
        self._send_sent_event = bool(conf.task_send_sent_event)
        self._event_serializer = conf.event_serializer
        self._event_exchange_name = conf.event_exchange

    def route(self, queue: str) -> Route:
        """The queue's route, as Celery's `send_task_message` resolves it (a queue it does
        not know yet is created, `task_create_missing_queues`)."""
        if queue not in self._routes:
            declared = self._app.amqp.queues[queue]
            exchange = declared.exchange
            if exchange.type != "direct":
                raise ValueError(f"queue {queue!r}: only direct exchanges are supported")
            mode = exchange.delivery_mode or self._app.conf.task_default_delivery_mode
            self._routes[queue] = Route(
                queue=queue,
                list_key=queue,
                exchange="",
                routing_key=queue,
                delivery_mode=maybe_delivery_mode(mode),
                binding_key=RedisChannel.keyprefix_queue % (exchange.name,),
                permanent_key=RedisChannel.keyprefix_binding_permanent % (exchange.name,),
                binding=RedisChannel.sep.join([declared.routing_key or "", "", queue]),
            )
        return self._routes[queue]

    def build(self, job: Job, queue: str) -> TaskMessage:
        """What `send_task(INFER_TASK, args=[job], task_id=job.request_id, queue=queue,
        expires=<job's deadline>)` would LPUSH, and the `task-sent` event it would send."""
        app, route = self._app, self.route(queue)
        headers, properties, body, sent_event = app.amqp.as_task_v2(
            job.request_id,
            redis_keys.INFER_TASK,
            args=[job.model_dump(mode="json")],
            expires=datetime.fromtimestamp(job.deadline, UTC),
            reply_to=app.thread_oid,
            create_sent_event=self._send_sent_event,
            ignore_result=None,  # what send_task passes when the caller says nothing
            argsrepr=args_repr(job),
            kwargsrepr="{}",
            origin=self._hostname,  # what as_task_v2 would compute on every call
        )
        content_type, content_encoding, data = serialize(body, serializer=self._serializer)
        if self._compression:
            data, headers["compression"] = compress(data, self._compression)
        expires_ms = int(max(0.0, job.deadline - time.time()) * 1000)
        properties.update(
            delivery_mode=route.delivery_mode,
            expiration=str(expires_ms),
            delivery_info={"exchange": route.exchange, "routing_key": route.routing_key},
            priority=0,
            body_encoding="base64",
            delivery_tag=uuid(),
        )
        envelope = {
            "body": _BASE64.encode(data),
            "content-encoding": content_encoding,
            "content-type": content_type,
            "headers": headers,
            "properties": properties,
        }
        if sent_event is not None:
            sent_event.update(queue=queue, exchange=route.exchange, routing_key=route.routing_key)
        return TaskMessage(route, json_dumps(envelope), sent_event)

    def sent_event(self, message: TaskMessage) -> Publish | None:
        """The `task-sent` event's PUBLISH, built apart from the message: the gateway
        builds and sends it once the task is queued, off the path to the first token (it
        is a third of the build)."""
        if message.sent_fields is None:
            return None
        return self._event("task-sent", dict(message.sent_fields))

    def _event(self, kind: str, fields: dict[str, Any]) -> Publish:
        """The PUBLISH that Celery's `EventDispatcher.send(kind, **fields)` would make."""
        event = Event(
            kind,
            hostname=self._hostname,
            utcoffset=utcoffset(),
            pid=os.getpid(),
            clock=self._app.clock.forward(),
            **fields,
        )
        content_type, content_encoding, data = serialize(event, serializer=self._event_serializer)
        envelope = {
            "body": _BASE64.encode(data),
            "content-encoding": content_encoding,
            "content-type": content_type,
            "headers": {"hostname": self._hostname},
            "properties": {
                "delivery_mode": 1,  # events are transient
                "delivery_info": {
                    "exchange": self._event_exchange_name,
                    "routing_key": kind.replace("-", "."),
                },
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": uuid(),
            },
        }
        routing_key = kind.replace("-", ".")
        channel = self._event_exchange
        if self._event_patterns:
            channel += "/" + routing_key
        return Publish(channel, json_dumps(envelope))


def args_repr(job: Job) -> str:
    """A task's arguments as Flower shows them: what the request is, not what it says."""
    kind = "stream" if job.stream else "reply"
    return f"[{job.request_id} {job.kind.value} model={job.model} {job.priority.value} {kind}]"


def _event_exchange_topic(app: Celery, options: dict[str, Any]) -> str:
    """The pub/sub channel of kombu's Redis fanout for Celery's event exchange, before the
    routing key (`Channel._get_publish_topic`): `/<db>.celeryev` with kombu's defaults."""
    prefix = options.get("fanout_prefix", True)
    if prefix is True:
        with Connection(app.conf.broker_url) as conn:
            vhost = str(conn.virtual_host or "").strip("/")
        prefix = RedisChannel.keyprefix_fanout.format(db=int(vhost) if vhost.isdigit() else 0)
    elif not prefix:
        prefix = ""
    return f"{prefix}{app.conf.event_exchange}"


def task_body(envelope: dict[str, Any]) -> Any:
    """The Celery body (`[args, kwargs, embed]`) of a kombu Redis entry, JSON-decoded."""
    body = envelope["body"]
    if envelope.get("properties", {}).get("body_encoding") == "base64":
        body = _BASE64.decode(body)
    return json_loads(body)


def set_task_body(envelope: dict[str, Any], body: Any) -> None:
    """Replace the Celery body of a kombu Redis entry, encoded as the entry says."""
    data = json_dumps(body)
    encoded = envelope.get("properties", {}).get("body_encoding") == "base64"
    envelope["body"] = _BASE64.encode(data.encode()) if encoded else data

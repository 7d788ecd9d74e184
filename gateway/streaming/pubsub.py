"""The gateway's pub/sub connection to Redis: the wire read by hiredis, right in the event
loop's read callback.

Every frame a worker publishes (every batch of tokens) arrives here. redis-py's asyncio
`PubSub` reads them through a task waiting on a stream reader, then several parsing layers
(one formats a debug string of every message, logged or not), and one event-loop turn more
before the frame reaches its request. This protocol parses in `data_received` and hands
each message to its callback in the same turn, at a fraction of the CPU
(`benchmarks/README.md`, "Costs behind the code").

It speaks what the stream hub needs and no more: AUTH, SUBSCRIBE, PSUBSCRIBE and PING, over
TCP, TLS (`rediss://`, with the `ssl_cert_reqs`/`ssl_ca_certs`/`ssl_check_hostname` URL
options redis-py takes) or a Unix socket. A PING every `PING_INTERVAL_S` detects a
connection that died silently (no FIN: a host gone, a network cut).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any, cast

import hiredis
from redis.connection import SSLConnection, UnixDomainSocketConnection, parse_url
from redis.exceptions import ResponseError

PING_INTERVAL_S = 30.0
PING_TIMEOUT_S = 10.0

OnMessage = Callable[[bytes, bytes], None]  # channel, data


class PubSubConnection(asyncio.Protocol):
    """One subscribed connection. `open` it, subscribe, then `run` until it is lost."""

    def __init__(self, on_message: OnMessage) -> None:
        self._on_message = on_message
        self._reader = hiredis.Reader()
        self._replies: deque[asyncio.Future[Any]] = deque()  # commands waiting, in order
        self._transport: asyncio.Transport | None = None
        self._lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @classmethod
    async def open(cls, url: str, on_message: OnMessage, timeout: float = 10.0) -> PubSubConnection:
        """Connect to the Redis at `url` (redis://, rediss://, unix://) and authenticate."""
        options = parse_url(url)
        loop = asyncio.get_running_loop()
        conn = cls(on_message)
        kind = options.get("connection_class")
        try:
            async with asyncio.timeout(timeout):
                if kind is UnixDomainSocketConnection:
                    await loop.create_unix_connection(lambda: conn, options["path"])
                else:
                    tls = _tls_context(options) if kind is SSLConnection else None
                    host, port = options.get("host", "localhost"), options.get("port", 6379)
                    await loop.create_connection(lambda: conn, host, port, ssl=tls)
                if options.get("password") is not None:
                    user = options.get("username")
                    await conn.command("AUTH", *([user] if user else []), options["password"])
        except BaseException:
            conn.close()
            raise
        return conn

    async def subscribe(self, channel: str) -> None:
        await self.command("SUBSCRIBE", channel)

    async def psubscribe(self, pattern: str) -> None:
        await self.command("PSUBSCRIBE", pattern)

    async def command(self, *args: str) -> Any:
        """Send one command and wait for its reply (an error reply is raised)."""
        if self._transport is None or self._lost.done():
            raise ConnectionError("The pub/sub connection to Redis is closed.")
        reply = asyncio.get_running_loop().create_future()
        self._replies.append(reply)
        self._transport.write(hiredis.pack_command(args))  # type: ignore[arg-type]
        return await reply

    async def run(self) -> None:
        """Until the connection is lost (then `ConnectionError`), pinging it now and then."""
        while True:
            done, _ = await asyncio.wait({self._lost}, timeout=PING_INTERVAL_S)
            if done:
                self._lost.result()  # raises why it was lost
            try:
                async with asyncio.timeout(PING_TIMEOUT_S):
                    await self.command("PING")
            except TimeoutError:
                self.close()
                raise ConnectionError(
                    "Redis did not answer a PING on the pub/sub connection."
                ) from None

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    # -- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's: not a subclass

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            kind = reply[0] if isinstance(reply, list) and reply else None
            if kind == b"pmessage":
                self._on_message(reply[2], reply[3])
            elif kind == b"message":
                self._on_message(reply[1], reply[2])
            elif self._replies:  # a confirmation, a pong, an AUTH reply: the oldest command's
                waiter = self._replies.popleft()
                if waiter.done():  # its caller gave up (a PING timed out)
                    continue
                if isinstance(reply, hiredis.ReplyError):
                    waiter.set_exception(ResponseError(str(reply)))
                else:
                    waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        err = ConnectionError(f"The pub/sub connection to Redis was lost: {exc or 'closed'}")
        if not self._lost.done():
            self._lost.set_exception(err)
        while self._replies:
            waiter = self._replies.popleft()
            if not waiter.done():
                waiter.set_exception(err)
        with contextlib.suppress(asyncio.InvalidStateError):
            self._lost.exception()  # retrieved: no "never retrieved" warning if nobody waits


def _tls_context(options: dict[str, Any]) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=options.get("ssl_ca_certs"))
    reqs = str(options.get("ssl_cert_reqs", "required")).lower()
    check = str(options.get("ssl_check_hostname", "true")).lower() not in ("false", "0", "no")
    context.check_hostname = check and reqs != "none"
    context.verify_mode = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL}.get(
        reqs, ssl.CERT_REQUIRED
    )
    return context

"""Step 4 of the request path: the worker's HTTP call to its llama-server child.

Streams are read on the task's own thread; `Abort.fire()` may be called from another thread
(the publisher, when the client went away) and shuts the socket down, which wakes the
blocked read at once and makes llama-server see the disconnect and free its slot.

The client is the standard library's `http.client`, one fresh connection per call:
llama-server closes a connection after a stream even though it advertises keep-alive,
and reusing one fails now and then. httpx cost more to the first token, and more CPU per
token (its pure-Python HTTP parser; `benchmarks/README.md`).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from common.engines import LLAMA_SERVER
from common.errors import CorralError, InvalidRequest, UpstreamError
from common.errors import Timeout as TimeoutError_

log = logging.getLogger(__name__)


UNREACHABLE = "upstream_unreachable"  # the connection failed: not the request's fault
CONNECT_TIMEOUT_S = 5.0
_JSON = {"Content-Type": "application/json"}


def noop() -> None:
    pass


class Aborted(Exception):
    """The stream was closed on purpose (cancel or client gone): not an upstream failure."""


class Abort:
    """Thread-safe handle to cut a running upstream call."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self.fired = False

    def attach(self, sock: socket.socket | None) -> None:
        with self._lock:
            self._sock = sock
            fired = self.fired
        if fired:
            self._shutdown()

    def fire(self) -> None:
        with self._lock:
            if self.fired:
                return
            self.fired = True
        self._shutdown()

    def _shutdown(self) -> None:
        with self._lock:
            sock = self._sock
        if sock is None:
            return
        with contextlib.suppress(OSError):  # already closed
            sock.shutdown(socket.SHUT_RDWR)


def upstream_error(status: int, raw: bytes, engine: str = LLAMA_SERVER) -> CorralError:
    """The engine's error reply in the OpenAI envelope, keeping its status and message."""
    try:
        err = json.loads(raw).get("error", {})
        message = err.get("message") or raw.decode(errors="replace")
    except (ValueError, AttributeError):
        err, message = {}, raw.decode(errors="replace")[:500] or f"HTTP {status}"
    if status in (400, 404, 422):
        return InvalidRequest(message, code=err.get("type") or "invalid_request", status=400)
    if status == 504:
        return TimeoutError_(message)
    return UpstreamError(f"{engine}: {message}", status=status if status >= 500 else 502)


@dataclass
class StreamEnd:
    usage: dict[str, Any] | None = None
    usage_chunk: str | None = None  # raw text of the usage-only chunk, if llama-server sent one
    timings: dict[str, Any] | None = None  # llama-server's `timings`, sent with the usage


class Upstream:
    """A client for the worker's local engine (llama-server unless the model names another:
    `engine`, the name its errors carry)."""

    def __init__(self, base_url: str, read_timeout: float, engine: str = LLAMA_SERVER) -> None:
        url = urlsplit(base_url)
        self._host, self._port = url.hostname or "127.0.0.1", url.port
        self._read_timeout = read_timeout
        self.engine = engine

    @contextmanager
    def _call(
        self,
        path: str,
        body: dict[str, Any],
        abort: Abort,
        on_sent: Callable[[], None],
        on_accepted: Callable[[], None] = noop,
    ) -> Iterator[http.client.HTTPResponse]:
        conn = http.client.HTTPConnection(self._host, self._port, timeout=CONNECT_TIMEOUT_S)
        try:
            conn.connect()
            assert conn.sock is not None
            conn.sock.settimeout(self._read_timeout)
            abort.attach(conn.sock)
            conn.request("POST", path, body=json.dumps(body).encode(), headers=_JSON)
            on_sent()
            resp = conn.getresponse()
            if resp.status != 200:
                raise upstream_error(resp.status, resp.read(), self.engine)
            on_accepted()
            yield resp
        except (OSError, http.client.HTTPException) as exc:
            if abort.fired:
                raise Aborted() from exc
            raise UpstreamError(f"{self.engine} call failed: {exc!r}", code=UNREACHABLE) from exc
        finally:
            conn.close()

    def request(
        self, path: str, body: dict[str, Any], abort: Abort, on_sent: Callable[[], None] = noop
    ) -> dict[str, Any]:
        """A whole (non-streaming) reply, passed through as llama-server sent it. `on_sent`
        runs once the request is on the wire, while llama-server works on it."""
        with self._call(path, body, abort, on_sent) as resp:
            raw = resp.read()
        try:
            data: dict[str, Any] = json.loads(raw)
        except ValueError:
            raise UpstreamError(
                f"{self.engine} sent a reply that is not JSON: {raw[:200]!r}"
            ) from None
        return data

    def stream(
        self,
        path: str,
        body: dict[str, Any],
        on_chunk: Callable[..., None],
        abort: Abort,
        on_sent: Callable[[], None] = noop,
        on_accepted: Callable[[], None] = noop,
    ) -> StreamEnd:
        """Relay each SSE `data:` payload (raw JSON text) to `on_chunk`, except the final
        usage-only chunk, which is returned (the caller relays it if the client asked).

        llama-server opens a chat stream with a chunk that carries only the assistant's
        role, a few hundredths of a millisecond before the first token. It is held and
        relayed with that token, `on_chunk(role, token)`: relayed alone, it made a batch of
        its own and the first token waited one flush interval behind it.

        `on_sent` runs once the request is on the wire; `on_accepted` once llama-server
        answered 200 (it has checked the prompt and is working on it)."""
        end = StreamEnd()
        held: tuple[str, ...] = ()
        first = True
        with self._call(path, body, abort, on_sent, on_accepted) as resp:
            for raw in iter(resp.readline, b""):
                line = raw.decode(errors="replace").rstrip("\r\n")
                if line.startswith("error:"):
                    raise _stream_error(line[6:].strip(), self.engine)
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                if data.startswith('{"error"'):
                    raise _stream_error(data, self.engine)
                if '"usage"' in data:
                    chunk = json.loads(data)
                    if chunk.get("usage"):
                        end.usage = chunk["usage"]
                        end.timings = chunk.get("timings")
                        if not chunk.get("choices"):
                            end.usage_chunk = data
                            continue
                if first and _role_only(data):
                    held, first = (data,), False
                    continue
                first = False
                on_chunk(*held, data)
                held = ()
            else:  # the connection ended before `data: [DONE]`
                if abort.fired:  # we shut the socket down: the read ended early, on purpose
                    raise Aborted()
                # http.client's chunked readline reads a connection dropped between two
                # chunks as the end: llama-server died (with its killed worker, say).
                raise UpstreamError(f"{self.engine} ended the stream early", code=UNREACHABLE)
        if held:
            on_chunk(*held)
        return end


def _role_only(data: str) -> bool:
    """A chunk whose one choice says nothing yet but who speaks (`{"role": "assistant"}`)."""
    try:
        choices = json.loads(data).get("choices") or []
    except (ValueError, AttributeError):
        return False
    if len(choices) != 1 or not isinstance(choices[0], dict) or choices[0].get("finish_reason"):
        return False
    delta = choices[0].get("delta") or {}
    return isinstance(delta, dict) and not any(v for k, v in delta.items() if k != "role")


def _stream_error(data: str, engine: str) -> CorralError:
    try:
        err = json.loads(data).get("error", {})
        body = json.dumps({"error": err}).encode()
        return upstream_error(int(err.get("code") or 500), body, engine)
    except (ValueError, AttributeError, TypeError):
        return UpstreamError(f"{engine} stream error: {data[:500]}")

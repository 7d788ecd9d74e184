"""workers.task.upstream against a stand-in HTTP server (a unit: the real llama-server path is
covered end to end by tests/gateway): SSE lines relayed, errors mapped to the OpenAI
envelope, a fired abort ends the read at once, an unreachable server is UNREACHABLE."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from common.engines import EngineConfig
from common.errors import CorralError, InvalidRequest
from common.settings import ModelConfig, Settings
from workers.task.runtime import Runtime
from workers.task.upstream import UNREACHABLE, Abort, Aborted, Upstream

ROLE = '{"choices":[{"finish_reason":null,"index":0,"delta":{"role":"assistant","content":null}}]}'
CHUNKS = ['{"choices":[{"delta":{"content":"a"}}]}', '{"choices":[{"delta":{"content":"b"}}]}']
USAGE = '{"choices":[],"usage":{"completion_tokens":2}}'


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/notjson":
            self.send_response(200)
            self.send_header("Content-Length", "7")
            self.end_headers()
            self.wfile.write(b"garbage")
            return
        if self.path == "/bad":
            body = b'{"error":{"code":400,"message":"the prompt is too long","type":"x"}}'
            self.send_response(400)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        chunks = (ROLE, *CHUNKS) if self.path == "/chat" else CHUNKS
        events = [f"data: {c}\n\n" for c in (*chunks, USAGE)]
        if self.path not in ("/slow", "/cut"):
            events.append("data: [DONE]\n\n")
        for event in events:
            self._chunk(event.encode())
        if self.path == "/slow":  # then nothing more for a long while
            time.sleep(5)
        if self.path == "/cut":  # the server dies between two chunks: no terminating chunk
            self.close_connection = True
            return
        self._chunk(b"")

    def _chunk(self, data: bytes) -> None:
        try:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()
        except OSError:
            pass


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        """A client that hung up (the abort tests do, on purpose) is no error; anything else
        is printed as socketserver does."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    server = Server(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_stream_relays_chunks_and_returns_the_usage_chunk(base: str) -> None:
    got: list[str] = []
    end = Upstream(base, read_timeout=10).stream("/ok", {}, got.append, Abort())
    assert got == CHUNKS
    assert end.usage == {"completion_tokens": 2} and end.usage_chunk == USAGE


def test_the_role_only_first_chunk_comes_with_the_first_token(base: str) -> None:
    calls: list[tuple[str, ...]] = []
    Upstream(base, read_timeout=10).stream("/chat", {}, lambda *c: calls.append(c), Abort())
    assert calls == [(ROLE, CHUNKS[0]), (CHUNKS[1],)]


def test_an_error_status_is_the_openai_envelope(base: str) -> None:
    with pytest.raises(InvalidRequest, match="too long") as err:
        Upstream(base, read_timeout=10).request("/bad", {}, Abort())
    assert err.value.status == 400


def test_a_fired_abort_ends_a_quiet_stream_at_once(base: str) -> None:
    abort, got = Abort(), []

    def on_chunk(data: str) -> None:
        got.append(data)
        if len(got) == len(CHUNKS):
            threading.Timer(0.2, abort.fire).start()  # from another thread, as the publisher

    started = time.monotonic()
    with pytest.raises(Aborted):
        Upstream(base, read_timeout=10).stream("/slow", {}, on_chunk, abort)
    assert time.monotonic() - started < 3  # not the server's 5 s


def test_a_stream_cut_between_chunks_is_not_a_complete_stream(base: str) -> None:
    """http.client's chunked readline says b"" (end) when the connection drops between two
    chunks, as when a killed worker takes its llama-server down: without `[DONE]` that is
    a lost llama-server, never a finished stream."""
    got: list[str] = []
    with pytest.raises(CorralError) as err:
        Upstream(base, read_timeout=10).stream("/cut", {}, got.append, Abort())
    assert err.value.code == UNREACHABLE
    assert got == CHUNKS  # what came before the cut was relayed


def test_an_unreachable_server_is_unreachable() -> None:
    with pytest.raises(CorralError) as err:
        Upstream("http://127.0.0.1:9", read_timeout=1).request("/x", {}, Abort())
    assert err.value.code == UNREACHABLE


def test_a_reply_that_is_not_json_is_an_upstream_error(base: str) -> None:
    with pytest.raises(CorralError, match="not JSON") as err:
        Upstream(base, read_timeout=10).request("/notjson", {}, Abort())
    assert err.value.status == 502


def test_errors_name_the_models_engine(base: str) -> None:
    """A model served by another engine (vLLM, say) is not blamed on llama-server."""
    with pytest.raises(CorralError, match=r"^vllm ended the stream early"):
        Upstream(base, read_timeout=10, engine="vllm").stream("/cut", {}, [].append, Abort())
    with pytest.raises(CorralError, match=r"^vllm call failed"):
        Upstream("http://127.0.0.1:9", read_timeout=1, engine="vllm").request("/x", {}, Abort())


def test_a_runtime_names_each_models_engine() -> None:
    engine = EngineConfig(command=["/opt/vllm/bin/vllm", "serve", "{model_path}"])
    models = {
        "v": ModelConfig(model_path=Path("/m/v"), engine=engine),
        "l": ModelConfig(model_path=Path("/m/l.gguf")),
    }
    rt = Runtime(Settings(models=models), "redis://unused", "w1", "http://127.0.0.1:1")
    assert rt.upstream("v").engine == "vllm"
    assert rt.upstream("l").engine == "llama-server"
    assert rt.upstream("dropped-in").engine == "llama-server"  # a GGUF found in models_dir
    assert rt.upstream("l") is rt.upstream("dropped-in")  # one client per engine

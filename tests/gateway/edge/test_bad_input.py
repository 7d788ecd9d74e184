"""Bad input gets a clear error in the OpenAI envelope, never a 500 or a hang.

Cases already in `test_openai_e2e.py` (malformed JSON, no messages, empty messages, a
string `max_tokens`, a bare non-UTF-8 body, an unknown model, an invalid priority, a
streamed prompt longer than the context) are not repeated. A gateway of its own runs with
small limits (64 KiB bodies, 1 KiB batch files, 1 s for a body or a request head), JSON
logs and CORS for one origin, on the shared cluster's Valkey and workers."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import CHAT, Cluster
from tests.gateway.helpers import assert_envelope, drop_keys, start_gateway

HI = [{"role": "user", "content": "Hello there"}]
MAX_BODY = 65536
UI = "https://ui.example"


@pytest.fixture(scope="module")
def gw(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    drop_keys(cluster.redis_url)  # open (loopback, no keys): these tests are about bodies
    running = start_gateway(
        cluster.redis_url,
        tmp_path_factory.mktemp("bad-input-gw"),
        CORRAL_MAX_BODY_BYTES=str(MAX_BODY),
        CORRAL_BODY_TIMEOUT="1",
        CORRAL_HEADER_TIMEOUT="1",
        CORRAL_LOG_FORMAT="json",
        CORRAL_MAX_FILE_BYTES="1024",
        CORRAL_CORS_ORIGINS=UI,
    )
    yield running
    running.stop()


def post(
    gw: Cluster, body: bytes | dict[str, object], path: str = "/v1/chat/completions", **kw: object
) -> httpx.Response:
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **kw.pop("headers", {})}  # type: ignore[dict-item]
    return httpx.post(f"{gw.base_url}{path}", content=body, headers=headers, timeout=30, **kw)  # type: ignore[arg-type]


def test_body_over_the_limit_is_413(gw: Cluster) -> None:
    big: dict[str, object] = {
        "model": CHAT,
        "messages": [{"role": "user", "content": "x" * MAX_BODY}],
    }
    assert_envelope(post(gw, big), 413, "invalid_request_error", "payload_too_large")


def test_chunked_body_over_the_limit_is_413(gw: Cluster) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: caught as it grows
        yield b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "'
        for _ in range(20):
            yield b"x" * 8192
        yield b'"}]}'

    r = httpx.post(
        f"{gw.base_url}/v1/chat/completions",
        content=chunks(),
        timeout=30,
        headers={"Content-Type": "application/json"},
    )
    assert_envelope(r, 413, "invalid_request_error", "payload_too_large")


def test_chunked_upload_over_the_file_limit_is_413(gw: Cluster) -> None:
    def parts() -> Iterator[bytes]:  # multipart is streamed to the route, and counted
        yield (
            b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.jsonl"\r\n'
            b"Content-Type: application/jsonl\r\n\r\n"
        )
        for _ in range(40):
            yield b"x" * 65536
        yield b"\r\n--b--\r\n"

    r = httpx.post(
        f"{gw.base_url}/v1/files",
        content=parts(),
        timeout=30,
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    )
    assert_envelope(r, 413, "invalid_request_error")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": HI}, "model"),  # missing model
        ({"model": 7, "messages": HI}, "model"),
        ({"model": CHAT, "messages": "hello"}, "messages"),
        ({"model": CHAT, "messages": [{"content": "no role"}]}, "messages.0.role"),
        ({"model": CHAT, "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"model": CHAT, "messages": HI, "temperature": "hot"}, "temperature"),
        ({"model": CHAT, "messages": HI, "temperature": 9}, "temperature"),
        ({"model": CHAT, "messages": HI, "max_tokens": 0}, "max_tokens"),
        ({"model": CHAT, "messages": HI, "stream": "maybe"}, "stream"),
        ({"model": CHAT, "messages": HI, "n": 3}, "n"),
    ],
)
def test_wrong_types_and_missing_fields_are_400(
    gw: Cluster, body: dict[str, object], param: str
) -> None:
    r = post(gw, body)
    assert_envelope(r, 400, "invalid_request_error")
    assert r.json()["error"]["param"] == param
    assert "Value error" not in r.json()["error"]["message"]  # pydantic's prefix, not ours


@pytest.mark.parametrize(
    "raw",
    [
        b"[]",
        b'"just a string"',
        b"null",
        b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
        b'{"model": "tiny-chat", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    ],
    ids=["array", "string", "null", "non-utf8-inside-json", "deeply-nested"],
)
def test_bodies_that_are_not_a_request_object_are_400(gw: Cluster, raw: bytes) -> None:
    assert_envelope(post(gw, raw), 400, "invalid_request_error")


def test_max_tokens_beyond_the_context_is_400(gw: Cluster) -> None:
    r = post(gw, {"model": CHAT, "messages": HI, "max_tokens": 1_000_000})
    assert_envelope(r, 400, "invalid_request_error", "context_length_exceeded")
    assert r.json()["error"]["param"] == "max_tokens"
    r = post(gw, {"model": CHAT, "prompt": "hi", "max_tokens": 10**9}, path="/v1/completions")
    assert_envelope(r, 400, "invalid_request_error", "context_length_exceeded")


def test_prompt_longer_than_the_context_is_400_without_streaming(gw: Cluster) -> None:
    long = [{"role": "user", "content": "hello " * 2000}]  # 12000 tokens: over 8192 per slot
    r = post(gw, {"model": CHAT, "messages": long, "max_tokens": 4})
    assert_envelope(r, 400, "invalid_request_error")
    assert "context" in r.json()["error"]["message"]


def test_slow_body_is_408(gw: Cluster) -> None:
    host, port = gw.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
            b'Content-Type: application/json\r\n\r\n{"model"'
        )
        started = time.monotonic()
        reply = _read_all(s)
    assert time.monotonic() - started < 5
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), reply
    assert json.loads(body)["error"]["code"] == "request_timeout"


def test_slowloris_request_head_is_cut_off(gw: Cluster) -> None:
    host, port = gw.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        closed = False
        for i in range(40):  # one more header line every 0.1 s, never the blank line
            try:
                s.sendall(f"X-Slow-{i}: y\r\n".encode())
            except OSError:
                closed = True
                break
            s.settimeout(0.1)
            try:
                if s.recv(1024) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
    assert closed, "the gateway kept a trickling request head open"
    assert time.monotonic() - started < 3


def test_gateway_still_serves_and_logs_json_with_request_ids(gw: Cluster) -> None:
    r = post(gw, {"model": CHAT, "messages": HI, "max_tokens": 2})
    assert r.status_code == 200, r.text
    rid = r.headers["x-request-id"]
    lines = [
        json.loads(line)
        for line in (gw.log_dir / "gateway.log").read_text().splitlines()
        if line.startswith("{")
    ]
    assert lines, "no JSON log lines"
    mine = [e for e in lines if rid in e["message"]]
    assert mine and all(e["request_id"] == rid for e in mine)
    assert {"ts", "level", "process", "logger", "message"} <= set(mine[0])


def test_cors_only_for_configured_origins(gw: Cluster, cluster: Cluster) -> None:
    preflight = {
        "Origin": UI,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    r = httpx.options(f"{gw.base_url}/v1/chat/completions", headers=preflight)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == UI
    other = httpx.options(
        f"{gw.base_url}/v1/chat/completions",
        headers={**preflight, "Origin": "https://evil.example"},
    )
    assert "access-control-allow-origin" not in other.headers
    to_delete = {**preflight, "Access-Control-Request-Method": "DELETE"}
    delete = httpx.options(f"{gw.base_url}/v1/files/file-x", headers=to_delete)
    assert delete.status_code == 200, delete.text  # a browser app may delete its files
    reply = post(gw, {"model": CHAT, "messages": HI, "max_tokens": 2}, headers={"Origin": UI})
    assert reply.headers["access-control-allow-origin"] == UI
    exposed = reply.headers["access-control-expose-headers"].lower()
    assert "x-request-id" in exposed and "x-ratelimit-remaining-requests" in exposed
    # off by default: the shared cluster sets no origins
    r = httpx.options(f"{cluster.base_url}/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in r.headers


def _read_all(s: socket.socket) -> bytes:
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data

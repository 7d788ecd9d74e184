"""benchmarks/load_simulator.py, the stand-in engine of the scale benchmarks, read by the
worker's own client: it must stream in the shape llama-server sends, or the benchmarks
measure a path that production never takes (its usage chunk once went unseen)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from common.net import free_port
from workers.task.upstream import Abort, Upstream

SIMULATOR = Path(__file__).resolve().parents[1] / "benchmarks" / "load_simulator.py"


@pytest.fixture
def simulator() -> Iterator[str]:
    port = free_port()
    argv = [sys.executable, str(SIMULATOR), "--port", str(port), "--tokens-per-s", "1000"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the simulator never answered /health"
            time.sleep(0.05)
        yield base
    finally:
        proc.terminate()
        proc.wait(5)


def test_the_worker_reads_its_stream_as_llama_servers(simulator: str) -> None:
    chunks: list[str] = []
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True}
    end = Upstream(simulator, read_timeout=5).stream(
        "/v1/chat/completions", body, lambda *c: chunks.extend(c), Abort()
    )
    contents = [json.loads(c)["choices"][0]["delta"].get("content") for c in chunks]
    assert contents == [None, "tok ", "tok ", "tok ", "tok ", "tok ", ""]  # role held, finish
    assert end.usage == {"prompt_tokens": 1, "completion_tokens": 5, "total_tokens": 6}
    assert end.usage_chunk is not None and '"usage":{' in end.usage_chunk  # compact JSON


def test_a_whole_reply_has_the_tokens_asked(simulator: str) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    reply = Upstream(simulator, read_timeout=5).request("/v1/chat/completions", body, Abort())
    assert reply["choices"][0]["message"]["content"] == "tok tok tok "
    assert reply["usage"]["completion_tokens"] == 3

"""The OpenAI Batch API with the official client, on real workers: results exactly once,
bad files refused with line numbers, cancel, failures in the error file, interactive
traffic ahead of batch items, and neither a worker's nor a gateway's death losing items."""

from __future__ import annotations

import io
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from common.net import free_port
from corral.redis_server import EmbeddedRedis
from corral.tinymodel import make_model
from tests.conftest import Cluster, start_cluster
from tests.support import corral_child, openai_client, wait_for, wait_healthy, workers

pytestmark = pytest.mark.slow  # every test here runs Corral processes

MODEL = "b-chat"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("batch") / f"{MODEL}.gguf")


@pytest.fixture(scope="module")
def bcluster(
    redis_server: EmbeddedRedis, model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    running = start_cluster(
        redis_server.url,
        tmp_path_factory.mktemp("batch-logs"),
        [["--model", str(model_path), "--slots", "2", "--ctx-size", "4096"]],
    )
    yield running
    running.stop()


def jsonl(n: int, max_tokens: int = 8, **overrides: Any) -> bytes:
    lines = []
    for i in range(n):
        body = {
            "model": MODEL,
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "messages": [{"role": "user", "content": f"request {i}"}],
            **overrides,
        }
        lines.append(
            json.dumps(
                {
                    "custom_id": f"item-{i}",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": body,
                }
            )
        )
    return ("\n".join(lines) + "\n").encode()


def submit(client: openai.OpenAI, content: bytes) -> Any:
    f = client.files.create(file=("input.jsonl", io.BytesIO(content)), purpose="batch")
    return client.batches.create(
        input_file_id=f.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"suite": "batches"},
    )


def wait_final(client: openai.OpenAI, batch_id: str, timeout: float = 60) -> Any:
    final = {"completed", "failed", "cancelled", "expired"}
    assert wait_for(lambda: client.batches.retrieve(batch_id).status in final, timeout, 0.2)
    return client.batches.retrieve(batch_id)


def completed(client: openai.OpenAI, batch_id: str) -> int:
    """How many of the batch's items have completed so far."""
    counts = client.batches.retrieve(batch_id).request_counts
    assert counts is not None
    return counts.completed


def lines_of(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    text = client.files.content(file_id).text
    return [json.loads(x) for x in text.splitlines() if x.strip()]


def test_batch_completes_each_custom_id_exactly_once(bcluster: Cluster) -> None:
    client = bcluster.client()
    batch = submit(client, jsonl(20))
    assert batch.status == "in_progress" and batch.request_counts.total == 20
    done = wait_final(client, batch.id)
    assert done.status == "completed", done
    assert done.request_counts.completed == 20 and done.request_counts.failed == 0
    assert done.metadata == {"suite": "batches"}
    out = lines_of(client, done.output_file_id)
    assert sorted(x["custom_id"] for x in out) == sorted(f"item-{i}" for i in range(20))
    for line in out:
        assert line["response"]["status_code"] == 200
        body = line["response"]["body"]
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]
        assert body["usage"]["completion_tokens"] == 8
    assert done.error_file_id is None
    listed = client.batches.list(limit=100)
    assert batch.id in [b.id for b in listed.data]


def test_malformed_file_is_refused_with_line_numbers(bcluster: Cluster) -> None:
    client = bcluster.client()
    good = json.loads(jsonl(1).decode())
    bad = [
        json.dumps(good),
        "{not json",
        json.dumps({**good, "method": "GET", "custom_id": "b"}),
        json.dumps(good),  # duplicate custom_id
        json.dumps({**good, "custom_id": "c", "body": {**good["body"], "model": "nope"}}),
        json.dumps({**good, "custom_id": "d", "body": {**good["body"], "messages": []}}),
    ]
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(
            file=("bad.jsonl", io.BytesIO("\n".join(bad).encode())), purpose="batch"
        )
    message = str(err.value)
    for line_no in (2, 3, 4, 5, 6):
        assert f"line {line_no}:" in message, message
    assert "line 1:" not in message


def test_failed_items_land_in_the_error_file(bcluster: Cluster) -> None:
    client = bcluster.client()
    long = {"messages": [{"role": "user", "content": "hello " * 5000}]}  # > the slot context
    content = (
        jsonl(3)
        + json.dumps(
            {
                "custom_id": "too-long",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": MODEL, "max_tokens": 4, **long},
            }
        ).encode()
        + b"\n"
    )
    done = wait_final(client, submit(client, content).id)
    assert done.status == "completed"
    assert (done.request_counts.completed, done.request_counts.failed) == (3, 1)
    (err_line,) = lines_of(client, done.error_file_id)
    assert err_line["custom_id"] == "too-long"
    assert err_line["response"]["status_code"] == 400
    assert err_line["error"]["message"]
    assert len(lines_of(client, done.output_file_id)) == 3


def test_cancel_midway_stops_items_not_started(bcluster: Cluster) -> None:
    client = bcluster.client()
    batch = submit(client, jsonl(150, max_tokens=64))
    assert wait_for(lambda: completed(client, batch.id) >= 4, 60)
    with pytest.raises(openai.ConflictError) as in_use:  # the batch still reads its input
        client.files.delete(batch.input_file_id)
    assert in_use.value.code == "file_in_use"
    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status in ("cancelling", "cancelled")
    done = wait_final(client, batch.id)
    assert done.status == "cancelled"
    out = lines_of(client, done.output_file_id)
    assert 4 <= len(out) < 150
    assert len(out) == done.request_counts.completed
    assert len({x["custom_id"] for x in out}) == len(out)
    assert client.files.delete(batch.input_file_id).deleted  # ended: it may go now


def test_interactive_stream_goes_ahead_of_batch_items(bcluster: Cluster) -> None:
    client = bcluster.client()
    batch = submit(client, jsonl(200, max_tokens=32))
    assert wait_for(lambda: completed(client, batch.id) >= 2, 60)
    t0 = time.monotonic()
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "now"}], max_tokens=4, stream=True
    )
    first = next(iter(stream))
    waited = time.monotonic() - t0
    list(stream)
    remaining = 200 - completed(client, batch.id)
    assert first.choices is not None
    assert remaining > 100, "the batch finished before the interactive request was served"
    assert waited < 3.0, f"interactive request waited {waited:.2f}s behind batch items"
    client.batches.cancel(batch.id)
    wait_final(client, batch.id)


def test_worker_killed_midway_loses_and_duplicates_nothing(
    redis_server: EmbeddedRedis, model_path: Path, tmp_path: Path
) -> None:
    # a separate alias so only these two workers serve it
    path = make_model(tmp_path / "b-kill.gguf")
    cluster = start_cluster(
        redis_server.url,
        tmp_path / "logs",
        [["--model", str(path), "--slots", "1", "--ctx-size", "4096"]] * 2,
    )
    try:
        client = cluster.client()
        content = jsonl(200, max_tokens=48).replace(MODEL.encode(), b"b-kill")
        batch = submit(client, content)
        assert wait_for(lambda: completed(client, batch.id) >= 30, 60)
        victim = cluster.children[1]
        assert victim.pid is not None
        os.kill(victim.pid, signal.SIGKILL)
        done = wait_final(client, batch.id, timeout=60)
        assert done.status == "completed", cluster.logs()
        out = lines_of(client, done.output_file_id)
        ids = [x["custom_id"] for x in out]
        assert len(ids) == len(set(ids)) == 200
        assert done.request_counts.completed == 200
    finally:
        cluster.stop()


def test_gateway_restarted_midway_batch_completes(
    bcluster: Cluster, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    port = free_port()
    gw = corral_child(
        "gw-temp",
        ["gateway", "--port", str(port)],
        tmp_path / "gw1.log",
        CORRAL_REDIS_URL=redis_server.url,
    )
    gw.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, 0)
        client = openai_client(f"{base}/v1")
        batch = submit(client, jsonl(60, max_tokens=32))
        assert gw.pid is not None
        os.kill(gw.pid, signal.SIGKILL)
        gw.stop()
        gw = corral_child(
            "gw-temp2",
            ["gateway", "--port", str(port)],
            tmp_path / "gw2.log",
            CORRAL_REDIS_URL=redis_server.url,
        )
        gw.start()
        wait_healthy(base, 0)
        done = wait_final(client, batch.id, timeout=60)
        assert done.status == "completed"
        assert len({x["custom_id"] for x in lines_of(client, done.output_file_id)}) == 60
    finally:
        gw.stop()
    assert workers(redis_server.url, MODEL)


def test_cli_submit_wait_and_results(bcluster: Cluster, tmp_path: Path) -> None:
    import subprocess
    import sys

    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl(5))
    base = ["--url", bcluster.base_url]
    run = subprocess.run(
        [sys.executable, "-m", "corral", "batches", "submit", str(path), "--wait", *base],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert run.returncode == 0, run.stderr
    batch_id = run.stdout.strip()
    assert batch_id.startswith("batch_") and "5/5" in run.stderr
    out = subprocess.run(
        [sys.executable, "-m", "corral", "batches", "results", batch_id, *base],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert sorted(json.loads(x)["custom_id"] for x in out.stdout.splitlines()) == [
        f"item-{i}" for i in range(5)
    ]
    shown = subprocess.run(
        [sys.executable, "-m", "corral", "batches", "show", batch_id, *base],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "[##############################] 5/5" in shown.stdout

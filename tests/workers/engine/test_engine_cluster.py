"""A model served through the generic `engine.command` path, end to end on real parts: a
gateway and workers whose models name their engine's command in the config (the real
llama-server binary, written out as any other engine would be), a Valkey of their own.

- `eng`: the engine's command runs llama-server on a GGUF file; the worker holds it from
  the start (`--model eng`).
- `dirmodel`: a model whose `model_path` is a directory (as a vLLM or SGLang model is),
  with `vram_mb`: nobody may read it as a GGUF nor mark it broken for not being one; it is
  placed on demand on the second worker.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import psutil
import pytest
from openai.types.chat import ChatCompletionMessageParam

from corral.tinymodel import make_model
from tests.conftest import Cluster, configured_cluster
from tests.gateway.helpers import samples, value
from tests.support import busy_slots, slow_model, wait_for, workers
from workers.engine.binary import resolve_binary

pytestmark = pytest.mark.slow  # every test here runs Corral processes

HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hi"}]
LLAMA_ARGS = ["--host", "{host}", "--port", "{port}", "--ctx-size", "{ctx_size}"]
LLAMA_ARGS += ["--parallel", "{slots}", "--alias", "{alias}", "--metrics", "--slots"]
LLAMA_ARGS += ["--threads", "{threads}"]


@pytest.fixture(scope="module")
def ec(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("engines")
    binary = str(resolve_binary())
    folder = root / "dirmodel"  # a model directory, as another engine's would be
    folder.mkdir()
    make_model(folder / "weights.gguf", seed=7)
    config: dict[str, Any] = {
        "models": {
            "eng": {
                "model_path": str(slow_model(root / "eng.gguf")),
                "ctx_size": 16384,
                "parallel": 2,
                "engine": {"command": [binary, "-m", "{model_path}", *LLAMA_ARGS]},
            },
            "dirmodel": {
                "model_path": str(folder),
                "ctx_size": 1024,
                "parallel": 1,
                "vram_mb": 60,
                "engine": {
                    "command": [binary, "-m", "{model_path}/weights.gguf", *LLAMA_ARGS],
                    "health": "/v1/models",
                    "name": "llama-server-dir",
                },
            },
        },
        "load_timeout": 30,
    }
    workers = [["--model", "eng"], ["--ram-budget", "200MiB", "--device", "other"]]
    with configured_cluster(root, config, workers, worker_states=("ready", "empty")) as c:
        yield c


def engine_child(ec: Cluster, alias: str) -> psutil.Process:
    (info,) = [w for w in workers(ec.redis_url) if w.model == alias and w.state == "ready"]
    (child,) = [p for p in psutil.Process(info.pid).children() if "--alias" in p.cmdline()]
    return child


def test_engine_command_streams(ec: Cluster) -> None:
    child = engine_child(ec, "eng")
    argv = child.cmdline()
    # the command as configured, placeholders filled: not the built-in llama-server argv
    assert "--no-webui" not in argv and argv[argv.index("--alias") + 1] == "eng"
    assert argv[argv.index("--ctx-size") + 1] == "16384" and argv[argv.index("--parallel") + 1]
    with ec.client(timeout=60) as client:
        chunks = list(
            client.chat.completions.create(
                model="eng", messages=HI, max_tokens=8, stream=True, extra_body={"ignore_eos": True}
            )
        )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].choices[0].finish_reason == "length"


def test_disconnect_mid_stream_frees_the_engine_slot(ec: Cluster) -> None:
    (info,) = workers(ec.redis_url, "eng")
    upstream = info.upstream
    assert upstream is not None
    body = {"model": "eng", "messages": HI, "max_tokens": 6000, "stream": True}
    body["ignore_eos"] = True
    with (
        httpx.Client(timeout=30) as http,
        http.stream("POST", f"{ec.base_url}/v1/chat/completions", json=body) as resp,
    ):
        assert resp.status_code == 200
        lines = resp.iter_lines()
        assert any(next(lines).startswith("data: ") for _ in range(6))
        assert busy_slots(upstream) >= 1
    left = time.monotonic()
    assert wait_for(lambda: busy_slots(upstream) == 0, 1.0, 0.002), ec.logs()
    print(f"engine slot freed {1000 * (time.monotonic() - left):.0f} ms after the client left")


def test_engine_reports_metrics(ec: Cluster) -> None:
    with ec.client(timeout=60) as client:
        client.chat.completions.create(
            model="eng", messages=HI, max_tokens=300, extra_body={"ignore_eos": True}
        )
    (info,) = workers(ec.redis_url, "eng")
    found = samples(httpx.get(f"http://127.0.0.1:{info.metrics_port}/metrics", timeout=10).text)
    labels = {"worker": info.id, "model": "eng"}
    assert value(found, "corral_worker_generated_tokens_total", **labels) >= 300
    assert value(found, "corral_worker_prompt_tokens_total", **labels) > 0
    assert value(found, "corral_worker_busy_slots", **labels) == 0
    assert value(found, "corral_worker_memory_used_bytes", **labels) > 0


def test_engine_restarts_after_kill_9(ec: Cluster) -> None:
    child = engine_child(ec, "eng")
    child.kill()  # kill -9
    assert wait_for(
        lambda: any(
            w.model == "eng" and w.state == "ready" and w.restarts >= 1 and w.upstream
            for w in workers(ec.redis_url)
        ),
        20,
        0.1,
    ), ec.logs()
    assert engine_child(ec, "eng").pid != child.pid
    with ec.client(timeout=60) as client:
        reply = client.chat.completions.create(model="eng", messages=HI, max_tokens=4)
    assert reply.choices[0].message.content is not None


def test_model_that_is_not_a_gguf_loads_on_demand(ec: Cluster) -> None:
    """Its header is never read: it is not marked broken, and its need is its `vram_mb`."""
    with ec.client(timeout=60) as client:
        reply = client.chat.completions.create(model="dirmodel", messages=HI, max_tokens=4)
    assert reply.choices[0].message.content is not None
    failed = httpx.get(f"{ec.base_url}/v1/models/failed", timeout=10).json()
    assert "dirmodel" not in str(failed), failed
    (info,) = workers(ec.redis_url, "dirmodel")
    assert info.device == "other"
    child = engine_child(ec, "dirmodel")
    assert child.cmdline()[2].endswith("dirmodel/weights.gguf")
    httpx.post(f"{ec.base_url}/v1/models/eject", json={"model": "dirmodel"}, timeout=10)
    assert wait_for(lambda: not workers(ec.redis_url, "dirmodel"), 20, 0.1)

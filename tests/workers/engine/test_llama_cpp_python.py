"""llama-cpp-python's OpenAI server as a second engine, end to end: a gateway and a worker
whose model names `python -m llama_cpp.server` as its engine's command (health on
`/v1/models`, no metrics page, one generation at a time), a Valkey of their own.

llama-cpp-python builds llama.cpp from source when installed (minutes on two cores), so it
is not one of Corral's dependencies nor installed by CI: these tests run where it is."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from openai.types.chat import ChatCompletionMessageParam

from corral.tinymodel import make_model
from tests.conftest import Cluster, configured_cluster
from tests.gateway.helpers import samples, value
from tests.support import workers

MISSING = [m for m in ("llama_cpp", "sse_starlette") if importlib.util.find_spec(m) is None]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        bool(MISSING),
        reason="llama-cpp-python's server is not installed (it compiles llama.cpp, minutes "
        "on two cores): pip install 'llama-cpp-python[server]' to run this test",
    ),
]

HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hi"}]
COMMAND = [sys.executable, "-m", "llama_cpp.server", "--model", "{model_path}"]
COMMAND += ["--model_alias", "{alias}", "--host", "{host}", "--port", "{port}"]
COMMAND += ["--n_ctx", "{ctx_size}", "--n_threads", "{threads}"]
COMMAND += ["--interrupt_requests", "false", "--verbose", "false"]


@pytest.fixture(scope="module")
def lcp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("llama-cpp-python")
    model: dict[str, Any] = {
        "model_path": str(make_model(root / "lcp.gguf", seed=11)),
        "ctx_size": 1024,
        "parallel": 1,
        "engine": {"command": COMMAND, "health": "/v1/models", "metrics": None},
    }
    config = {"models": {"lcp": model}, "load_timeout": 60}
    with configured_cluster(root, config, [["--model", "lcp"]]) as c:
        yield c


def test_llama_cpp_python_answers_through_corral(lcp: Cluster) -> None:
    with lcp.client(timeout=60) as client:
        reply = client.chat.completions.create(model="lcp", messages=HI, max_tokens=6)
        chunks = list(
            client.chat.completions.create(model="lcp", messages=HI, max_tokens=6, stream=True)
        )
        text = client.completions.create(model="lcp", prompt="Once", max_tokens=4)
    # a whole reply is assembled from the engine's stream, and llama-cpp-python's streams
    # carry no usage (it ignores `stream_options`): the reply has none
    assert reply.choices[0].message.content is not None
    assert any(c.choices and c.choices[0].delta.content for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert text.choices[0].text is not None


def test_engine_without_metrics_still_reports_the_rest(lcp: Cluster) -> None:
    (info,) = workers(lcp.redis_url, "lcp")
    found = samples(httpx.get(f"http://127.0.0.1:{info.metrics_port}/metrics", timeout=10).text)
    labels = {"worker": info.id, "model": "lcp"}
    assert value(found, "corral_worker_slots", **labels) == 1
    assert value(found, "corral_worker_model_state", **labels, state="ready") == 1
    assert value(found, "corral_worker_memory_used_bytes", **labels) > 0
    assert not any(name == "corral_worker_generated_tokens_total" for name, _ in found)

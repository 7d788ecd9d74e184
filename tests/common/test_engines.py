"""Engine configs (`common.engines`, `ModelConfig.engine`): placeholders, the default
llama-server command, memory claimed by an engine's own flag, and what a non-GGUF model
may and may not do."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from common.engines import EngineConfig, claimed_mb, expand, llama_server
from common.errors import LlamaServerError
from common.memory import profile
from common.settings import ModelConfig, Settings


def model(**fields: object) -> ModelConfig:
    return ModelConfig.model_validate(fields)


VLLM = ["vllm", "serve", "{model_path}", "--port", "{port}", "--served-model-name", "{alias}"]


def test_expand_fills_placeholders_and_leaves_other_braces() -> None:
    argv = expand(
        [*VLLM, "--override-generation-config", '{"temperature": 0}', "{model_path}/x"],
        {"model_path": Path("/m/qwen"), "port": 8123, "alias": "qwen"},
    )
    assert argv == [
        "vllm",
        "serve",
        "/m/qwen",
        "--port",
        "8123",
        "--served-model-name",
        "qwen",
        "--override-generation-config",
        '{"temperature": 0}',
        "/m/qwen/x",
    ]


def test_a_placeholder_without_a_value_is_named() -> None:
    with pytest.raises(LlamaServerError, match=r"\{mmproj\}"):
        expand(["--mmproj", "{mmproj}"], {"mmproj": None})


def test_unknown_placeholder_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ValidationError, match=r"unknown placeholder \{modelpath\}.*\{model_path\}"):
        EngineConfig(command=["vllm", "serve", "{modelpath}"])
    with pytest.raises(ValidationError, match="unknown placeholder"):
        EngineConfig(command=["x"], env={"A": "{nope}"})


def test_the_default_engine_is_a_command_like_any_other() -> None:
    assert llama_server().command == [
        "{llama_server}",
        "-m",
        "{model_path}",
        "--host",
        "{host}",
        "--port",
        "{port}",
        "--ctx-size",
        "{ctx_size}",
        "--parallel",
        "{slots}",
        "--alias",
        "{alias}",
        "--metrics",
        "--slots",
        "--no-webui",
    ]
    every = llama_server(embedding=True, mmproj=True, threads=True).command
    assert " ".join(every).endswith(
        "--threads {threads} --embeddings --pooling mean --mmproj {mmproj}"
    )
    assert llama_server().program == "llama-server"


def test_program_names() -> None:
    assert EngineConfig(command=VLLM).program == "vllm"
    assert EngineConfig(command=["python3", "-m", "sglang.launch_server"]).program == (
        "sglang.launch_server"
    )
    assert EngineConfig(command=["/opt/bin/x"], name="mine").program == "mine"


def test_memory_claimed_by_the_engine_flag() -> None:
    assert claimed_mb([*VLLM, "--gpu-memory-utilization", "0.5"], 24000) == 12000
    assert claimed_mb(["--mem-fraction-static=0.25"], 8000) == 2000
    assert claimed_mb(VLLM, 24000) is None  # not said: unknown
    assert claimed_mb(["--gpu-memory-utilization", "0.5"], None) is None  # no budget known
    assert claimed_mb(["--gpu-memory-utilization", "lots"], 8000) is None
    assert claimed_mb(["--gpu-memory-utilization", "2"], 8000) is None


def test_model_engine_forms() -> None:
    assert model(model_path="m.gguf").custom_engine is None
    assert model(model_path=Path("m.gguf"), engine="llama-server").is_gguf
    with pytest.raises(ValidationError, match="unknown engine 'vllm'"):
        model(model_path=Path("m"), engine="vllm")
    vllm = model(model_path=Path("/models/qwen"), engine={"command": VLLM}, flags=["-x"])
    assert vllm.custom_engine is not None and not vllm.is_gguf
    assert vllm.engine_flags == [*VLLM, "-x"]
    lcp = model(model_path=Path("tiny.GGUF"), engine={"command": ["python3"]})
    assert lcp.is_gguf  # another engine, a GGUF file: read and estimated as one
    with pytest.raises(ValidationError, match="ctx_size: auto"):
        model(model_path=Path("/models/qwen"), engine={"command": VLLM}, ctx_size="auto")
    again = ModelConfig.model_validate_json(vllm.model_dump_json())  # the catalog's round trip
    assert again == vllm


def test_the_engine_is_part_of_the_memory_profile() -> None:
    plain = model(model_path="m.gguf")
    other = model(model_path=Path("m.gguf"), engine={"command": ["python3", "{port}"]})
    assert profile(plain, 2, "cpu") != profile(other, 2, "cpu")
    assert "engine=" not in profile(plain, 2, "cpu")  # llama-server's profiles are unchanged


def test_cache_switch() -> None:
    assert model(model_path="m.gguf").cache is None
    on = model(model_path=Path("m.gguf"), cache=True).cache
    assert on is not None and on.ttl == 3600
    assert model(model_path=Path("m.gguf"), cache="off").cache is None
    short = model(model_path=Path("m.gguf"), cache={"ttl": 5}).cache
    assert short is not None and short.ttl == 5


def test_a_slow_engine_is_waited_for_as_long_as_its_ready_timeout() -> None:
    settings = Settings(load_timeout=120)
    slow = model(model_path="/m/q", engine={"command": VLLM, "ready_timeout": 900})
    assert settings.load_timeout_for(slow) == 900
    assert settings.load_timeout_for(model(model_path="/m/q", engine={"command": VLLM})) == 120
    assert settings.load_timeout_for(model(model_path="m.gguf")) == 120

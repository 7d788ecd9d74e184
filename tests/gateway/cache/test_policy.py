"""Which requests the response cache may answer, and what their key depends on."""

from __future__ import annotations

import os
from pathlib import Path

from common.jobs import JobKind
from common.settings import ModelConfig
from gateway.cache.policy import Directive, cacheable, directive, entry_key, identity

CHAT = JobKind.CHAT
BODY = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 5}


def test_cacheable_only_where_the_input_decides_the_output() -> None:
    assert cacheable(CHAT, BODY)
    assert cacheable(CHAT, {**BODY, "temperature": 0.0})
    assert cacheable(CHAT, {**BODY, "temperature": 0.7, "seed": 3})
    assert not cacheable(CHAT, {**BODY, "temperature": 0.7})
    assert not cacheable(CHAT, {"messages": []})  # the engine's default temperature
    assert not cacheable(CHAT, {**BODY, "temperature": 0.7, "seed": None})
    assert cacheable(JobKind.EMBEDDING, {"input": "x"})


def test_cache_control() -> None:
    assert directive(None) is Directive.USE
    assert directive("max-age=60") is Directive.USE
    assert directive("no-cache") is Directive.REFRESH
    assert directive("No-Cache, max-age=5") is Directive.REFRESH
    assert directive("max-age=0") is Directive.REFRESH
    assert directive("no-cache, no-store") is Directive.BYPASS


def test_key_ignores_delivery_and_number_spelling_but_not_content_or_tenant() -> None:
    key = entry_key("m", CHAT, BODY, "key_a")
    assert key == entry_key("m", CHAT, {**BODY, "stream": True, "model": "x"}, "key_a")
    assert key == entry_key("m", CHAT, {**BODY, "stream_options": {"include_usage": 1}}, "key_a")
    assert key == entry_key("m", CHAT, {**BODY, "temperature": 0.0, "max_tokens": 5.0}, "key_a")
    assert key == entry_key("m", CHAT, dict(reversed(BODY.items())), "key_a")
    assert key != entry_key("m", CHAT, {**BODY, "max_tokens": 6}, "key_a")
    assert key != entry_key("m", CHAT, BODY, "key_b")  # one tenant never reads another's
    assert key != entry_key("m", CHAT, BODY, None)  # nor the admin's
    assert key != entry_key("other", CHAT, BODY, "key_a")
    assert key != entry_key("m", JobKind.COMPLETION, BODY, "key_a")


def test_identity_follows_the_models_file_engine_and_flags(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF one")
    model = ModelConfig(model_path=path)
    first = identity("m", model)
    assert first == identity("m", model)
    assert first != identity("n", model)
    assert first != identity("m", model.model_copy(update={"flags": ["--temp", "0"]}))
    other = ModelConfig.model_validate({"model_path": str(path), "engine": {"command": ["x"]}})
    assert first != identity("m", other)
    path.write_bytes(b"GGUF two, longer")
    os.utime(path, (1, 1))
    assert first != identity("m", model)  # a new file under the same alias starts afresh
    gone = ModelConfig(model_path=tmp_path / "elsewhere.gguf")  # on the workers' disks only
    assert identity("m", gone) == identity("m", gone)

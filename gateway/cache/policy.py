"""Which requests the response cache may answer, and the key of their reply.

A request is cacheable when its input decides its output: `temperature: 0` or a `seed`
(after the model's defaults are applied), and every embedding request. Its key is a hash
of the model's identity (its alias, its engine and flags, and its file's version: a new
file under the same alias starts afresh), the request kind, the normalized body (what
the worker would get, less how the reply is delivered: `stream`, `stream_options`,
`service_tier`) and the caller's tenant (its key's id), so one tenant never reads
another's answer. `Cache-Control: no-cache` skips the lookup but keeps the new reply;
`no-store` does neither.
"""

from __future__ import annotations

import hashlib
import json
from enum import StrEnum
from typing import Any

from common.estimate import file_identity
from common.jobs import JobKind
from common.settings import ModelConfig

# How a reply is delivered, not what it says: not part of the key.
DELIVERY_FIELDS = frozenset({"stream", "stream_options", "service_tier", "model"})


class Directive(StrEnum):
    USE = "use"  # look up, and keep a new reply
    REFRESH = "refresh"  # `no-cache`: do not look up; keep the new reply
    BYPASS = "bypass"  # `no-store`: neither


def directive(cache_control: str | None) -> Directive:
    """What the client's `Cache-Control` header allows."""
    if not cache_control:
        return Directive.USE
    tokens = {t.strip().lower().replace(" ", "") for t in cache_control.split(",")}
    if "no-store" in tokens:
        return Directive.BYPASS
    if "no-cache" in tokens or "max-age=0" in tokens:
        return Directive.REFRESH
    return Directive.USE


def cacheable(kind: JobKind, body: dict[str, Any]) -> bool:
    """Whether the body's input decides its output."""
    if kind is JobKind.EMBEDDING:
        return True
    if body.get("seed") is not None:
        return True
    temperature = body.get("temperature")
    return isinstance(temperature, int | float) and temperature == 0


def identity(alias: str, model: ModelConfig) -> str:
    """What makes this model answer as it does: its alias, engine, flags, and its file's
    version where this gateway sees the file (else its path)."""
    try:
        version = file_identity(model.model_path)
    except OSError:
        version = str(model.model_path)
    engine = model.custom_engine.command if model.custom_engine else model.engine
    parts = [alias, json.dumps(engine), json.dumps(model.flags), version, str(model.mmproj)]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:32]


def entry_key(model_identity: str, kind: JobKind, body: dict[str, Any], tenant: str | None) -> str:
    """The digest naming one reply: model, kind, normalized body and tenant."""
    fields = {k: _normal(v) for k, v in body.items() if k not in DELIVERY_FIELDS}
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    material = "\x00".join([model_identity, kind.value, tenant or "", text])
    return hashlib.sha256(material.encode()).hexdigest()


def _normal(value: Any) -> Any:
    """`0.0` and `0`, `1.0` and `1` as one number, at any depth."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normal(v) for v in value]
    return value

"""API keys: the record kept in Redis for each user key, and how secrets are made and hashed.

A secret is `sk-corral-` + 256 random bits. Redis keeps only its SHA-256 (`keys.API_KEYS`,
a hash from digest to this record), so a dump of Redis lets nobody in. A plain hash, not a
slow password KDF: the secrets are random, not chosen by people, so there is nothing to
brute-force, and the gateway hashes on every request. Lookup is by digest, so no step
compares a presented secret with a stored one byte by byte; the comparisons that remain
(the admin key, a record's own digest) use `hmac.compare_digest`.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

from pydantic import BaseModel, Field

from common.priority import Priority

SECRET_PREFIX = "sk-corral-"


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def digest(secret: str) -> str:
    """The SHA-256 hex digest a secret is stored and looked up under."""
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


def same_secret(secret: str, stored_digest: str) -> bool:
    """Constant-time: does `secret` hash to `stored_digest`?"""
    return hmac.compare_digest(digest(secret), stored_digest)


def hint(secret: str) -> str:
    """What `corral keys list` shows of a secret: enough to tell keys apart, no more."""
    return f"{SECRET_PREFIX}...{secret[-4:]}"


def new_key_id() -> str:
    return f"key_{secrets.token_hex(6)}"


class ApiKey(BaseModel):
    """A user key. Limits left at None are unlimited; `models` None means every model."""

    id: str = Field(default_factory=new_key_id)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[\w.@-]+$")
    digest: str = Field(pattern=r"^[0-9a-f]{64}$")
    hint: str
    max_priority: Priority = Priority.HIGH
    rpm: int | None = Field(default=None, ge=1)  # requests per minute
    tpm: int | None = Field(default=None, ge=1)  # tokens (prompt + completion) per minute
    models: list[str] | None = None
    created_at: float = Field(default_factory=time.time)

    def allows_model(self, alias: str) -> bool:
        return self.models is None or alias in self.models


def issue(name: str, **limits: object) -> tuple[ApiKey, str]:
    """A new key record and its secret. The secret is returned once and stored nowhere."""
    secret = new_secret()
    key = ApiKey.model_validate(
        {"name": name, "digest": digest(secret), "hint": hint(secret), **limits}
    )
    return key, secret

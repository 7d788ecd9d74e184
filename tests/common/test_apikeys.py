"""Key records and hashing: secrets are random, stored only as digests."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from common.apikeys import SECRET_PREFIX, ApiKey, digest, hint, issue, same_secret
from common.priority import Priority


def test_issue_makes_a_fresh_secret_and_keeps_only_its_digest() -> None:
    key, secret = issue("alice", rpm=10, models=["m"])
    other, other_secret = issue("bob")
    assert secret.startswith(SECRET_PREFIX) and len(secret) > len(SECRET_PREFIX) + 40
    assert secret != other_secret and key.id != other.id
    dumped = key.model_dump_json()
    assert secret not in dumped and secret[len(SECRET_PREFIX) : -4] not in dumped
    assert key.digest == digest(secret) and len(key.digest) == 64
    assert key.hint == hint(secret) and key.hint.endswith(secret[-4:])


def test_same_secret_is_exact() -> None:
    key, secret = issue("alice")
    assert same_secret(secret, key.digest)
    assert not same_secret(secret[:-1], key.digest)
    assert not same_secret(secret + "x", key.digest)
    assert not same_secret("", key.digest)


def test_defaults_are_unlimited_and_every_model() -> None:
    key, _ = issue("alice")
    assert key.max_priority is Priority.HIGH and key.rpm is None and key.tpm is None
    assert key.allows_model("anything")
    limited, _ = issue("bob", models=["a", "b"])
    assert limited.allows_model("a") and not limited.allows_model("c")


@pytest.mark.parametrize(
    "bad", [{"name": ""}, {"name": "has space"}, {"name": "x", "rpm": 0}, {"name": "x", "tpm": -1}]
)
def test_invalid_records_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        ApiKey.model_validate({"digest": "0" * 64, "hint": "h", **bad})

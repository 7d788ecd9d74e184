"""Property-based fuzzing of the gateway's own OpenAPI schema with schemathesis:
whatever it sends, the reply is never a 5xx and always comes (bounded examples, a
timeout on every call). Runs against the shared cluster, so valid requests reach real
workers; `max_tokens` is clamped so that a valid request stays quick."""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings

from tests.conftest import Cluster

CALL_TIMEOUT_S = 30
MAX_TOKENS = 8
# Routes whose effect would disturb other tests (placement, ejecting models, cancels):
# they are exercised by their own tests.
SKIP_METHODS = {"POST", "DELETE"}
FUZZED_POSTS = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings"}
ENDLESS = {"/v1/models/status/stream"}  # an event feed that never ends, by design


@pytest.fixture
def gateway_schema(cluster: Cluster) -> Any:
    schema = schemathesis.openapi.from_url(f"{cluster.base_url}/openapi.json")
    schema.config.base_url = cluster.base_url
    return schema


schema = schemathesis.pytest.from_fixture("gateway_schema")


def clamp(body: Any) -> None:
    """A valid request still runs on a real model: keep it to a few tokens."""
    if isinstance(body, dict):
        for field in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(field), int) and body[field] > MAX_TOKENS:
                body[field] = MAX_TOKENS
        if "messages" in body or "prompt" in body:
            body.setdefault("max_tokens", MAX_TOKENS)


@schema.parametrize()
@settings(
    max_examples=12,
    deadline=None,
    database=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
def test_no_5xx_and_no_hang(case: Any) -> None:
    method = case.operation.method.upper()
    if method in SKIP_METHODS and case.path not in FUZZED_POSTS:
        pytest.skip("a state-changing route")
    if case.path in ENDLESS:
        pytest.skip("an endless event stream")
    if case.method.upper() != method and case.method.upper() in SKIP_METHODS:
        return  # a probe with another method (expects 405) that might reach a real route
    clamp(case.body)
    response = case.call(timeout=CALL_TIMEOUT_S)
    assert response.status_code < 500, (case.method, case.path, case.body, response.text)
    if response.status_code >= 400 and response.headers.get("content-type") == ["application/json"]:
        err = response.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}

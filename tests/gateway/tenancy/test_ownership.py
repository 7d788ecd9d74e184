"""What one team's key may see of another's: files,
batches and their results, and request records belong to the key that made them; any other
user key gets 404 as if they did not exist, while the admin key sees everything. A key
limited to some models lists only those. Real gateway with an admin key, on the shared
cluster's Valkey and workers, driven by the official `openai` client."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import CHAT, EMBED, Cluster
from tests.gateway.helpers import (
    ADMIN_KEY,
    add_key,
    assert_envelope,
    bearer,
    client,
)

HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello there"}]
pytestmark = pytest.mark.usefixtures("no_keys_left")


def batch_file(n: int) -> bytes:
    body = {"model": CHAT, "messages": HI, "max_tokens": 2}
    lines = [
        json.dumps(
            {"custom_id": f"t-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
        )
        for i in range(n)
    ]
    return ("\n".join(lines) + "\n").encode()


def test_files_and_batches_belong_to_the_key_that_made_them(gw: Cluster) -> None:
    _, alice_secret = add_key(gw.redis_url, "alice")
    _, bob_secret = add_key(gw.redis_url, "bob")
    alice, bob, admin = (client(gw.base_url, s) for s in (alice_secret, bob_secret, ADMIN_KEY))

    upload = alice.files.create(file=("in.jsonl", io.BytesIO(batch_file(2))), purpose="batch")
    assert upload.id in {f.id for f in alice.files.list()}
    assert upload.id not in {f.id for f in bob.files.list()}
    assert upload.id in {f.id for f in admin.files.list()}
    assert admin.files.retrieve(upload.id).id == upload.id
    peek: Callable[[str], object]
    for peek in (bob.files.retrieve, bob.files.content, bob.files.delete):
        with pytest.raises(openai.NotFoundError):
            peek(upload.id)
    with pytest.raises(openai.NotFoundError):  # nor may bob run alice's prompts as his batch
        bob.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )

    batch = alice.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert batch.id in {b.id for b in alice.batches.list()}
    assert batch.id not in {b.id for b in bob.batches.list()}
    assert batch.id in {b.id for b in admin.batches.list()}
    for peek in (bob.batches.retrieve, bob.batches.cancel):
        with pytest.raises(openai.NotFoundError):
            peek(batch.id)
    raw = httpx.get(f"{gw.base_url}/v1/batches/{batch.id}", headers=bearer(alice_secret))
    assert raw.status_code == 200 and "owner" not in raw.json()  # never sent to clients

    deadline = time.monotonic() + 60
    while (batch := alice.batches.retrieve(batch.id)).status != "completed":
        assert batch.status in ("validating", "in_progress", "finalizing"), batch
        assert time.monotonic() < deadline, batch
        time.sleep(0.2)
    assert batch.output_file_id is not None and batch.request_counts is not None
    assert batch.request_counts.completed == 2
    results = alice.files.content(batch.output_file_id).text.splitlines()
    assert sorted(json.loads(line)["custom_id"] for line in results) == ["t-0", "t-1"]
    with pytest.raises(openai.NotFoundError):  # the results are alice's too
        bob.files.content(batch.output_file_id)
    assert batch.output_file_id not in {f.id for f in bob.files.list()}
    assert admin.files.content(batch.output_file_id).text.splitlines() == results

    alice.files.delete(upload.id)
    with pytest.raises(openai.NotFoundError):
        admin.files.retrieve(upload.id)


def test_a_request_is_read_and_cancelled_only_by_its_key(gw: Cluster) -> None:
    alice_id, alice_secret = add_key(gw.redis_url, "alice")
    _, bob_secret = add_key(gw.redis_url, "bob")
    reply = client(gw.base_url, alice_secret).chat.completions.with_raw_response.create(
        model=CHAT, messages=HI, max_tokens=2
    )
    request_id = reply.headers["x-request-id"]
    with httpx.Client(base_url=gw.base_url, timeout=10) as http:
        own = http.get(f"/v1/requests/{request_id}", headers=bearer(alice_secret))
        assert own.status_code == 200 and own.json()["owner"] == alice_id, own.text
        seen = http.get(f"/v1/requests/{request_id}", headers=bearer(ADMIN_KEY))
        assert seen.status_code == 200 and seen.json()["state"] == "done", seen.text

        other = http.get(f"/v1/requests/{request_id}", headers=bearer(bob_secret))
        assert_envelope(other, 404, "invalid_request_error", "request_not_found")
        # bob cannot even learn that it exists: a 404, where alice is told it already ended
        cancel = f"/v1/requests/{request_id}/cancel"
        other = http.post(cancel, headers=bearer(bob_secret))
        assert_envelope(other, 404, "invalid_request_error", "request_not_found")
        own = http.post(cancel, headers=bearer(alice_secret))
        assert_envelope(own, 409, "invalid_request_error", "request_already_ended")


def test_a_key_lists_only_the_models_it_may_use(gw: Cluster) -> None:
    _, limited = add_key(gw.redis_url, "chat-only", models=[CHAT])
    _, unlimited = add_key(gw.redis_url, "everything")
    assert [m.id for m in client(gw.base_url, limited).models.list()] == [CHAT]
    assert client(gw.base_url, limited).models.retrieve(CHAT).id == CHAT
    with pytest.raises(openai.NotFoundError):
        client(gw.base_url, limited).models.retrieve(EMBED)
    for secret in (unlimited, ADMIN_KEY):
        assert {CHAT, EMBED} <= {m.id for m in client(gw.base_url, secret).models.list()}

"""The batch store's cancel (`gateway.batches.store.BatchStore.cancel`), on a bare Valkey: only a
batch in progress starts cancelling, checked and set in one step, so a cancel that races
the supervisor's "finalizing" and final writes never overwrites them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
import redis
import redis.asyncio as aioredis

from common import redis_keys
from common.batch import Batch, BatchState
from common.errors import BatchNotFound, CorralError
from corral.redis_server import EmbeddedRedis
from gateway.batches.files import RedisFileStore
from gateway.batches.store import STALE_FINALIZING_S, BatchStore

T = TypeVar("T")


def _with_store(url: str, use: Callable[[BatchStore], Awaitable[T]]) -> T:
    async def run() -> T:
        client = aioredis.Redis.from_url(url, decode_responses=True)
        try:
            return await use(BatchStore(client, RedisFileStore(client)))
        finally:
            await client.aclose()

    return asyncio.run(run())


def _cancel(url: str, batch_id: str) -> Batch | CorralError:
    async def cancel(store: BatchStore) -> Batch | CorralError:
        try:
            return await store.cancel(batch_id)
        except CorralError as err:
            return err

    return _with_store(url, cancel)


def _stored(url: str, status: BatchState) -> Batch:
    batch = Batch(endpoint="/v1/chat/completions", input_file_id="file-in", status=status)
    _with_store(url, lambda store: store.save_new(batch))
    return batch


@pytest.fixture
def url(r: redis.Redis, own_redis: EmbeddedRedis) -> str:
    """`own_redis`'s URL, emptied first (by `r`)."""
    return own_redis.url


def test_a_batch_in_progress_starts_cancelling(r: redis.Redis, url: str) -> None:
    batch = _stored(url, BatchState.IN_PROGRESS)
    got = _cancel(url, batch.id)
    assert isinstance(got, Batch) and got.status is BatchState.CANCELLING
    assert got.cancelling_at is not None
    again = _cancel(url, batch.id)  # a second cancel changes nothing
    assert isinstance(again, Batch) and again.status is BatchState.CANCELLING
    assert again.cancelling_at == got.cancelling_at


@pytest.mark.parametrize(
    "status", [BatchState.FINALIZING, BatchState.COMPLETED, BatchState.FAILED, BatchState.EXPIRED]
)
def test_a_batch_past_progress_is_not_cancellable_and_stays_as_it_is(
    r: redis.Redis, url: str, status: BatchState
) -> None:
    """What the supervisor wrote last stands (a cancel used to read "in_progress" and then
    write "cancelling" over "finalizing" or the final status)."""
    batch = _stored(url, status)
    got = _cancel(url, batch.id)
    assert isinstance(got, CorralError) and got.status == 409
    assert got.code == "batch_not_cancellable"
    assert r.hget(redis_keys.batch_key(batch.id), "status") == status.value
    assert not r.hexists(redis_keys.batch_key(batch.id), "cancelling_at")


def test_a_cancelled_batch_is_returned_as_it_is(r: redis.Redis, url: str) -> None:
    batch = _stored(url, BatchState.CANCELLED)
    got = _cancel(url, batch.id)
    assert isinstance(got, Batch) and got.status is BatchState.CANCELLED


def test_an_unknown_batch_is_not_found(r: redis.Redis, url: str) -> None:
    got = _cancel(url, "batch_nope")
    assert isinstance(got, BatchNotFound) and got.status == 404
    assert not r.exists(redis_keys.batch_key("batch_nope"))


def test_one_finalizer_at_a_time(r: redis.Redis, url: str) -> None:
    """Two gateways that both believed they led (a round longer than the leader lock) must
    not both write a batch's files: the second finds it finalizing already. A finalizer
    that died midway is replaced once its mark is stale."""
    running = _stored(url, BatchState.IN_PROGRESS)
    assert _with_store(url, lambda store: store.begin_finalizing(running.id))
    assert not _with_store(url, lambda store: store.begin_finalizing(running.id))
    assert r.hget(redis_keys.batch_key(running.id), "status") == BatchState.FINALIZING.value
    stale = time.time() - STALE_FINALIZING_S - 1
    r.hset(redis_keys.batch_key(running.id), "finalizing_at", int(stale))  # its finalizer died
    assert _with_store(url, lambda store: store.begin_finalizing(running.id))
    done = _stored(url, BatchState.COMPLETED)
    assert not _with_store(url, lambda store: store.begin_finalizing(done.id))
    assert r.hget(redis_keys.batch_key(done.id), "status") == BatchState.COMPLETED.value

"""Step 2 of the request path: a validated request becomes a Celery task on its queue.

`send_task` blocks (it talks to Redis through kombu), so it runs on a small thread pool,
never on the event loop; Celery's producer pool (`broker_pool_limit`) is shared by those
threads. Cancelling sets a cancel key the worker checks before and while it runs, and
revokes the task id so a worker that has not fetched it yet discards it.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import redis.asyncio as aioredis
from celery import Celery

from common import keys
from common.celery_config import celery_config
from common.errors import CorralError, QueueFull
from common.frames import Frame, FrameType
from common.jobs import Job
from common.settings import Settings
from common.tracking import RequestState
from gateway.tracking import Tracker

log = logging.getLogger(__name__)

CANCEL_TTL_S = 3600


class Dispatcher:
    def __init__(self, settings: Settings, redis_url: str, client: aioredis.Redis) -> None:
        self._settings = settings
        self._redis = client
        self._celery = Celery("corral-gateway", set_as_current=False)
        self._celery.conf.update(celery_config(settings, redis_url=redis_url))
        self.tracker = Tracker(client)
        self._pool = ThreadPoolExecutor(
            max_workers=min(32, settings.broker_pool_limit), thread_name_prefix="corral-enqueue"
        )

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._celery.close()

    async def submit(self, job: Job, *, resubmit: bool = False) -> None:
        """Enqueue `job` on its model's queue for its priority, within the depth cap, and
        record it (`GET /v1/requests/{id}`)."""
        await self._admit(job, resubmit)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._pool, self._send, job)
        log.info(
            "job=%s model=%s priority=%s kind=%s stream=%s enqueued",
            job.request_id, job.model, job.priority.value, job.kind.value, job.stream,
        )  # fmt: skip

    def _send(self, job: Job) -> None:
        self._celery.send_task(
            keys.INFER_TASK,
            args=[job.model_dump(mode="json")],
            task_id=job.request_id,
            queue=keys.queue_name(job.model, job.priority),
            expires=datetime.fromtimestamp(job.deadline, UTC),
        )

    async def send_batch_items(self, jobs: list[Job]) -> None:
        """Enqueue batch items on their model's batch queue: below every interactive
        priority, and outside the interactive depth cap (a batch may hold thousands)."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._pool, self._send_many, jobs)

    def _send_many(self, jobs: list[Job]) -> None:
        for job in jobs:
            self._celery.send_task(
                keys.INFER_TASK,
                args=[job.model_dump(mode="json")],
                task_id=job.request_id,
                queue=keys.batch_queue(job.model),
                expires=datetime.fromtimestamp(job.deadline, UTC),
            )

    async def _admit(self, job: Job, resubmit: bool) -> None:
        """One round trip: the model's queue depth, and the request's record."""
        pipe = self._redis.pipeline(transaction=False)
        for queue in keys.model_queues(job.model):
            pipe.llen(queue)
        self.tracker.record(pipe, job)
        depth = sum((await pipe.execute())[:3])
        limit = self._settings.max_queue_size_per_model
        if depth >= limit and not resubmit:
            await self._redis.delete(keys.request_key(job.request_id))
            raise QueueFull(
                f"The queue for model {job.model!r} is full ({depth} waiting, limit {limit}). "
                "Retry later.",
                retry_after=5,
            )

    async def cancel(
        self, request_id: str, *, started: bool, state: RequestState = RequestState.CANCELLED
    ) -> None:
        """Make sure `request_id` never runs, or stops running (its worker sees the key
        between chunks and closes its llama-server stream, which frees the slot). A task
        not started yet is also revoked, so a worker that fetches it discards it unrun."""
        await self._redis.set(keys.cancel_key(request_id), "1", ex=CANCEL_TTL_S)
        if not started:
            await self.tracker.end_if_queued(request_id, state, f"{state.value} while queued")
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._pool, self._revoke, request_id)
        log.info("job=%s %s started=%s", request_id, state.value, started)

    async def notify(self, channel: str, err: CorralError) -> None:
        """End a request's stream from outside its worker (an out-of-band final frame)."""
        frame = Frame(seq=-1, type=FrameType.ERROR, error=err.body(), status=err.status)
        await self._redis.publish(channel, frame.model_dump_json(exclude_defaults=True))

    def _revoke(self, request_id: str) -> None:
        try:
            self._celery.control.revoke(request_id)
        except Exception as exc:  # the cancel key alone is enough; revoke only saves a fetch
            log.warning("job=%s revoke failed: %r", request_id, exc)

"""What a worker measured about a request it ran, for its record and its model's telemetry
(`common.telemetry`): queue wait, service time, time to first token, tokens, llama-server's
timings. Computed once the call ended, off the path to the first token."""

from __future__ import annotations

import time
from typing import Any

from common.jobs import Job
from common.telemetry import Outcome
from common.tracking import RequestState


def measured(
    job: Job,
    state: RequestState,
    began: float,
    first_chunk_at: float | None,
    usage: dict[str, Any] | None,
    timings: dict[str, Any] | None,
) -> Outcome:
    """What the record and the model's telemetry keep of a request that ran. Its time to
    first token: when the first chunk came (a stream), else when llama-server had its first
    token (the call's start plus llama-server's prompt time); none for embeddings."""
    now = time.time()
    first = first_chunk_at
    if first is None and timings and isinstance(timings.get("prompt_ms"), int | float):
        first = began + timings["prompt_ms"] / 1000
    usage = usage or {}
    return Outcome(
        state,
        interactive=job.batch_id is None,
        wait_ms=max(0.0, began - job.enqueued_at) * 1000,
        service_ms=(now - began) * 1000,
        ttft_ms=max(0.0, first - job.enqueued_at) * 1000 if first is not None else None,
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        cached_tokens=cached_tokens(usage),
        timings=timings,
    )


def cached_tokens(usage: dict[str, Any]) -> int | None:
    """The prompt tokens the engine took from its prompt cache (OpenAI's
    `usage.prompt_tokens_details.cached_tokens`, which llama-server sends), if it says."""
    details = usage.get("prompt_tokens_details")
    value = details.get("cached_tokens") if isinstance(details, dict) else None
    return int(value) if isinstance(value, int | float) else None

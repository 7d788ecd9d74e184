"""OpenAI's Files and Batch APIs: the batch records (`store`), where files live (`files`),
per-owner indexes (`owner_index`), creating batches and enqueueing their items
(`intake`), the one-gateway-at-a-time supervisor (`supervisor`), and the files a batch
leaves (`output`)."""

from __future__ import annotations

from gateway.batches.intake import BatchRunner
from gateway.batches.supervisor import BatchSupervisor

__all__ = ["BatchRunner", "BatchSupervisor"]

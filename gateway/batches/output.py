"""What a batch leaves behind: its output and error files, written in input order when it
ends, and the error line of an item that could not be run (lost with its workers too many
times, or not run before the batch expired)."""

from __future__ import annotations

import json

import redis.asyncio as aioredis

from common import redis_keys
from common.batch import RECORD_RESULT_LUA, Batch, BatchLine, BatchState, FileObject, result_line
from gateway.batches.files import FileStore
from gateway.batches.store import item_id


async def write_files(
    client: aioredis.Redis,
    files: FileStore,
    batch: Batch,
    final: BatchState,
    lines: list[BatchLine],
) -> dict[str, str]:
    """The output file (items answered 200) and the error file (the others), each written
    if not empty; returns the batch fields naming them. An expired batch reports each item
    it never ran."""
    raw = await client.hgetall(redis_keys.batch_results_key(batch.id))
    results = {str(k): json.loads(v) for k, v in raw.items()}
    output: list[str] = []
    errors: list[str] = []
    for i, line in enumerate(lines):
        result = results.get(line.custom_id)
        if result is None and final is BatchState.EXPIRED:
            result = _expired_line(item_id(batch.id, i), line.custom_id)
        if result is None or result.get("skipped"):
            continue
        ok = (result.get("response") or {}).get("status_code") == 200
        (output if ok else errors).append(json.dumps(result))
    fields = {}
    if output:
        fields["output_file_id"] = (await _write(files, batch, output)).id
    if errors:
        fields["error_file_id"] = (await _write(files, batch, errors)).id
    return fields


async def _write(files: FileStore, batch: Batch, lines: list[str]) -> FileObject:
    content = "\n".join(lines) + "\n"
    meta = FileObject(
        bytes=len(content.encode()),
        filename=f"{batch.id}_output.jsonl",
        purpose="batch_output",
        owner=batch.owner,
    )
    return await files.put(meta, content)


def _expired_line(request_id: str, custom_id: str) -> dict[str, object]:
    why = "This request could not be executed before the batch expired."
    return result_line(request_id, custom_id, error={"code": "batch_expired", "message": why})


async def record_lost(
    client: aioredis.Redis, batch_id: str, request_id: str, custom_id: str, tries: int
) -> None:
    """The same once-only write as a worker's (`workers.task.batch_sink`), for an item that
    kept being lost with its workers."""
    why = f"The workers running this request were lost {tries} times."
    line = result_line(request_id, custom_id, error={"code": "worker_lost", "message": why})
    script = client.register_script(RECORD_RESULT_LUA)
    await script(
        keys=[redis_keys.batch_results_key(batch_id), redis_keys.batch_key(batch_id)],
        args=[custom_id, json.dumps(line), "failed"],
    )

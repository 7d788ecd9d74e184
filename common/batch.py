"""The OpenAI Files and Batch API objects, and the check of a batch input file's lines.

Shapes follow OpenAI's (so the official clients work unchanged): a batch moves
validating → in_progress → finalizing → completed (or failed / expired /
cancelling → cancelled); each output line is `{"id", "custom_id", "response":
{"status_code", "request_id", "body"}, "error"}`.
"""

from __future__ import annotations

import json
import time
import uuid
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from common.wire import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    first_problem,
)

ENDPOINTS: dict[str, type[BaseModel]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/v1/embeddings": EmbeddingRequest,
}


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex}"


def new_batch_id() -> str:
    return f"batch_{uuid.uuid4().hex}"


class FileObject(BaseModel):
    id: str = Field(default_factory=new_file_id)
    object: Literal["file"] = "file"
    bytes: int
    created_at: int = Field(default_factory=lambda: int(time.time()))
    filename: str
    purpose: str
    status: str = "processed"
    # The id of the API key that made it (`gateway.tenancy.ownership`); kept beside the
    # object, never sent to clients.
    owner: str | None = Field(default=None, exclude=True)


class BatchState(StrEnum):
    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (
            BatchState.FAILED,
            BatchState.COMPLETED,
            BatchState.EXPIRED,
            BatchState.CANCELLED,
        )


class RequestCounts(BaseModel):
    total: int = 0
    completed: int = 0
    failed: int = 0


class LineError(BaseModel):
    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[LineError]


class Batch(BaseModel):
    id: str = Field(default_factory=new_batch_id)
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str = "24h"
    status: BatchState = BatchState.VALIDATING
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int = Field(default_factory=lambda: int(time.time()))
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts = Field(default_factory=RequestCounts)
    metadata: dict[str, str] | None = None
    # The id of the API key that made it (`gateway.tenancy.ownership`); its items and result files
    # belong to that key too. Kept in the batch's record, never sent to clients.
    owner: str | None = Field(default=None, exclude=True)


class BatchLine(BaseModel):
    """One checked input line: what a batch item task carries."""

    custom_id: str
    method: Literal["POST"]
    url: str
    body: dict[str, Any]


class OutputLine(BaseModel):
    id: str
    custom_id: str
    response: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


def result_line(
    request_id: str,
    custom_id: str,
    response: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One item's line of the output or error file; its id follows from the item's request
    id, so whoever writes it (a worker, the supervisor) writes the same line."""
    line = OutputLine(id=f"batch_req_{request_id}", custom_id=custom_id, response=response,
                      error=error)  # fmt: skip
    return line.model_dump()


# An item's result, written once: HSETNX on its custom_id and the matching counter's
# increment are one script, so a redelivered item (kill -9 of a worker mid-batch) is never
# written nor counted twice, and the counters add up to the results present. Only into a
# batch still running (in progress, or cancelling: running items finish and are reported):
# once the supervisor has marked it finalizing it reads the results to write the files,
# and a result recorded after that would be counted but in no file.
# KEYS: the results hash, the batch. ARGV: custom_id, the line, the counter.
# Returns the counter's new value; -1: already recorded; -2: the batch is past running.
RECORD_RESULT_LUA = f"""
local status = redis.call('HGET', KEYS[2], 'status')
if status ~= '{BatchState.IN_PROGRESS.value}' and status ~= '{BatchState.CANCELLING.value}' then
  return -2
end
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  return redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
end
return -1
"""


def parse_input(
    content: bytes, known_models: set[str], endpoint: str | None = None
) -> tuple[list[BatchLine], list[LineError]]:
    """Every line of a batch input file checked the way OpenAI reports batch `errors`:
    valid JSON, a unique `custom_id`, `method` POST, a supported `url` (the batch's
    endpoint, when given), a body that validates, and a model this cluster serves."""
    lines: list[BatchLine] = []
    errors: list[LineError] = []
    seen: set[str] = set()
    try:
        text = content.decode()
    except UnicodeDecodeError:
        return [], [LineError(code="invalid_file", message="The file is not valid UTF-8.")]
    # Lines end at "\n" only: `str.splitlines` also splits at U+2028, U+0085 and others,
    # which JSON allows raw inside strings.
    for number, raw in enumerate(text.split("\n"), start=1):
        raw = raw.removesuffix("\r")
        if not raw.strip():
            continue
        err = _check_line(raw, number, seen, known_models, endpoint)
        if isinstance(err, LineError):
            errors.append(err)
        else:
            lines.append(err)
    if not lines and not errors:
        errors.append(LineError(code="empty_file", message="The file has no requests."))
    return lines, errors


def _check_line(
    raw: str, number: int, seen: set[str], models: set[str], endpoint: str | None
) -> BatchLine | LineError:
    def bad(code: str, message: str, param: str | None = None) -> LineError:
        return LineError(code=code, message=message, param=param, line=number)

    try:
        line = BatchLine.model_validate(json.loads(raw))
    except json.JSONDecodeError as exc:
        return bad(
            "invalid_json_line", f"Line {number} is not JSON: {exc.msg} at column {exc.colno}."
        )
    except ValidationError as exc:
        where, msg = first_problem(exc.errors())
        what = f"{where}: {msg}" if where else msg
        return bad(
            "invalid_json_line", f"Line {number} is not a request object ({what})."[:300], where
        )
    if line.custom_id in seen:
        return bad(
            "duplicate_custom_id", f"custom_id {line.custom_id!r} is not unique.", "custom_id"
        )
    seen.add(line.custom_id)
    wire = ENDPOINTS.get(line.url)
    if wire is None or (endpoint is not None and line.url != endpoint):
        allowed = endpoint or ", ".join(ENDPOINTS)
        return bad("invalid_url", f"url {line.url!r} is not supported here: use {allowed}.", "url")
    try:
        body = wire.model_validate(line.body)
    except ValidationError as exc:
        where, msg = first_problem(exc.errors())
        param = f"body.{where}" if where else "body"
        return bad("invalid_body", f"{param}: {msg}", param)
    if line.body.get("stream"):
        return bad("invalid_body", "Batch requests cannot stream.", "body.stream")
    model = getattr(body, "model", None)
    if model not in models:
        return bad(
            "model_not_found", f"The model {model!r} is not served by this cluster.", "body.model"
        )
    return line

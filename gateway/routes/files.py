"""The OpenAI Files API, for batch input and output: `POST /v1/files` (multipart,
`purpose=batch`, JSONL checked line by line), list, get, content, delete. A user key sees
only the files it uploaded and the results of its own batches (`gateway.tenancy.ownership`)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import Response

from common.batch import FileObject, parse_input
from common.errors import FileNotFound, InvalidRequest, PayloadTooLarge
from gateway.deps import State
from gateway.tenancy.ownership import Caller, CallerDep

router = APIRouter(tags=["batch"])

MAX_REPORTED = 20  # line errors listed in a refusal


@router.post("/v1/files")
async def upload(
    state: State,
    caller: CallerDep,
    file: Annotated[UploadFile, File()],
    purpose: Annotated[str, Form()],
) -> FileObject:
    if purpose != "batch":
        raise InvalidRequest(
            f"Unsupported purpose {purpose!r}: only 'batch' files are accepted.", param="purpose"
        )
    limit = state.settings.max_file_bytes
    content = await file.read(limit + 1)
    if len(content) > limit:
        raise PayloadTooLarge(f"The file is larger than the limit of {limit} bytes.", param="file")
    _, errors = parse_input(content, set(await state.catalog.all()))
    if errors:
        listed = "; ".join(
            f"line {e.line}: {e.message}" if e.line else e.message for e in errors[:MAX_REPORTED]
        )
        more = f" (and {len(errors) - MAX_REPORTED} more)" if len(errors) > MAX_REPORTED else ""
        raise InvalidRequest(
            f"Invalid batch file: {listed}{more}.", param="file", code="invalid_batch_file"
        )
    meta = FileObject(
        bytes=len(content),
        filename=file.filename or "batch.jsonl",
        purpose=purpose,
        owner=caller.owner,
    )
    return await state.batches.store.files.put(meta, content.decode())


@router.get("/v1/files")
async def list_files(
    state: State,
    caller: CallerDep,
    purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
    after: str | None = None,
) -> dict[str, Any]:
    files = await state.batches.store.files.list(purpose, limit, after, caller.viewer)
    return {"object": "list", "data": [f.model_dump() for f in files]}


async def _meta(state: State, file_id: str, caller: Caller) -> FileObject:
    meta = await state.batches.store.files.get(file_id)
    return caller.own(meta, FileNotFound(f"No file {file_id!r}.", param="file_id"))


@router.get("/v1/files/{file_id}")
async def get_file(file_id: str, state: State, caller: CallerDep) -> FileObject:
    return await _meta(state, file_id, caller)


@router.get("/v1/files/{file_id}/content")
async def file_content(file_id: str, state: State, caller: CallerDep) -> Response:
    await _meta(state, file_id, caller)
    content = await state.batches.store.files.content(file_id)
    return Response(content or "", media_type="application/octet-stream")


@router.delete("/v1/files/{file_id}")
async def delete_file(file_id: str, state: State, caller: CallerDep) -> dict[str, Any]:
    await _meta(state, file_id, caller)
    if await state.batches.store.active_using(file_id):
        raise InvalidRequest(
            f"File {file_id!r} is the input of a batch that has not finished; delete it "
            "once the batch has ended (or been cancelled).",
            param="file_id",
            code="file_in_use",
            status=409,
        )
    await state.batches.store.files.delete(file_id)
    return {"id": file_id, "object": "file", "deleted": True}

"""`/v1/files` and `/v1/batches`: OpenAI's Batch API, scoped to the calling key."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from fastapi.responses import Response

from app.access.deps import PrincipalDep
from app.access.service import Principal
from app.batches.schemas import (
    BatchCreate,
    BatchList,
    BatchObject,
    FileDeleted,
    FileList,
    FileObject,
    page_ids,
)
from app.batches.service import BatchService, FileService
from app.core.provide import provide
from app.core.schemas import PageLimit
from app.operations.submit import Owner

router = APIRouter(tags=["batches"])

FilesDep = Annotated[FileService, Depends(provide(FileService))]
BatchesDep = Annotated[BatchService, Depends(provide(BatchService))]


def owner_of(principal: Principal) -> Owner:
    return Owner(key_id=principal.key_id, team_id=principal.team_id)


@router.post("/v1/files", response_model=FileObject)
async def upload_file(
    principal: PrincipalDep,
    files: FilesDep,
    file: Annotated[UploadFile, File(description="A JSONL file, one request per line.")],
    purpose: Annotated[str, Form(max_length=32)],
) -> FileObject:
    """Upload a JSONL file to run as a batch (`purpose=batch`)."""
    # One byte past the limit is enough to refuse the file without reading all of it.
    content = await file.read(files.max_bytes + 1)
    stored = await files.upload(
        owner=owner_of(principal),
        filename=file.filename or "upload.jsonl",
        purpose=purpose,
        content=content,
    )
    return FileObject.of(stored)


@router.get("/v1/files", response_model=FileList)
async def list_files(
    principal: PrincipalDep,
    files: FilesDep,
    purpose: str | None = Query(default=None, max_length=32),
    limit: PageLimit = 20,
    after: str | None = Query(default=None, description="The id of the last file seen."),
) -> FileList:
    """The caller's files, newest first."""
    page = await files.list_files(
        owner=owner_of(principal), purpose=purpose, limit=limit, after=after
    )
    data = [FileObject.of(f) for f in page.items]
    return FileList(data=data, has_more=page.next_cursor is not None, **page_ids(data))


@router.get("/v1/files/{file_id}", response_model=FileObject)
async def get_file(file_id: str, principal: PrincipalDep, files: FilesDep) -> FileObject:
    """A file's description."""
    return FileObject.of(await files.get(file_id, owner=owner_of(principal)))


@router.get("/v1/files/{file_id}/content", response_class=Response)
async def get_file_content(file_id: str, principal: PrincipalDep, files: FilesDep) -> Response:
    """A file's content (JSONL)."""
    stored = await files.get(file_id, owner=owner_of(principal))
    return Response(stored.content.encode(), media_type="application/jsonl")


@router.delete("/v1/files/{file_id}", response_model=FileDeleted)
async def delete_file(file_id: str, principal: PrincipalDep, files: FilesDep) -> FileDeleted:
    """Delete a file; batches already created from it are not affected."""
    stored = await files.delete(file_id, owner=owner_of(principal))
    return FileDeleted(id=stored.id)


@router.post("/v1/batches", response_model=BatchObject)
async def create_batch(
    body: BatchCreate, principal: PrincipalDep, batches: BatchesDep
) -> BatchObject:
    """Run every line of an uploaded JSONL file; poll the batch for its output file."""
    view = await batches.create(
        owner=owner_of(principal),
        input_file_id=body.input_file_id,
        endpoint=body.endpoint,
        completion_window=body.completion_window,
        metadata=body.metadata,
    )
    return BatchObject.of(view)


@router.get("/v1/batches", response_model=BatchList)
async def list_batches(
    principal: PrincipalDep,
    batches: BatchesDep,
    limit: PageLimit = 20,
    after: str | None = Query(default=None, description="The id of the last batch seen."),
) -> BatchList:
    """The caller's batches, newest first."""
    views, has_more = await batches.list_batches(
        owner=owner_of(principal), limit=limit, after=after
    )
    data = [BatchObject.of(v) for v in views]
    return BatchList(data=data, has_more=has_more, **page_ids(data))


@router.get("/v1/batches/{batch_id}", response_model=BatchObject)
async def get_batch(batch_id: str, principal: PrincipalDep, batches: BatchesDep) -> BatchObject:
    """A batch's status, request counts and, once finished, its output and error files."""
    return BatchObject.of(await batches.get(batch_id, owner=owner_of(principal)))


@router.post("/v1/batches/{batch_id}/cancel", response_model=BatchObject)
async def cancel_batch(batch_id: str, principal: PrincipalDep, batches: BatchesDep) -> BatchObject:
    """Stop a batch; requests already answered stay in its output file."""
    return BatchObject.of(await batches.cancel(batch_id, owner=owner_of(principal)))

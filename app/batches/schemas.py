"""Files and batches in OpenAI's wire format."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.batches.entities import StoredFile
from app.batches.service import BatchView


def _unix(instant: datetime | None) -> int | None:
    return int(instant.timestamp()) if instant is not None else None


class FileObject(BaseModel):
    """An uploaded or generated file, without its content."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None

    @classmethod
    def of(cls, stored: StoredFile) -> FileObject:
        return cls(
            id=stored.id,
            bytes=stored.size_bytes,
            created_at=int(stored.created_at.timestamp()),
            filename=stored.filename,
            purpose=stored.purpose,
        )


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class BatchCreate(BaseModel):
    """`POST /v1/batches`."""

    model_config = ConfigDict(extra="ignore")

    input_file_id: str = Field(min_length=1, max_length=64)
    endpoint: str = Field(min_length=1, max_length=64)
    completion_window: str = Field(min_length=1, max_length=16)
    metadata: dict[str, str] | None = None


class BatchError(BaseModel):
    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchObject(BaseModel):
    """A batch as OpenAI shows it."""

    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: str
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts
    metadata: dict[str, str] | None = None

    @classmethod
    def of(cls, view: BatchView) -> BatchObject:
        b = view.batch
        errors = None
        if b.errors:
            errors = BatchErrors(data=[BatchError.model_validate(e) for e in b.errors])
        return cls(
            id=b.id,
            endpoint=b.endpoint,
            errors=errors,
            input_file_id=b.input_file_id,
            completion_window=b.completion_window,
            status=view.status.value,
            output_file_id=b.output_file_id,
            error_file_id=b.error_file_id,
            created_at=int(b.created_at.timestamp()),
            in_progress_at=_unix(b.in_progress_at),
            expires_at=_unix(b.expires_at),
            finalizing_at=_unix(view.finalizing_at),
            completed_at=_unix(b.completed_at),
            failed_at=_unix(b.failed_at),
            expired_at=_unix(b.expired_at),
            cancelling_at=_unix(b.cancelling_at),
            cancelled_at=_unix(b.cancelled_at),
            request_counts=RequestCounts(
                total=b.request_total, completed=view.completed, failed=view.failed
            ),
            metadata=b.meta,
        )


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchObject]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


def page_ids(data: list[Any]) -> dict[str, str | None]:
    """`first_id` and `last_id` of a list page."""
    return {
        "first_id": data[0].id if data else None,
        "last_id": data[-1].id if data else None,
    }

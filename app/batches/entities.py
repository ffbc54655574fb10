"""The files and batches tables: uploaded JSONL, and OpenAI-style batches over it."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa

from app.storage.entity import Entity, big, choice, instant, json_list, json_value, pk, text


class FilePurpose(StrEnum):
    BATCH = "batch"  # uploaded by a client as the input of a batch
    BATCH_OUTPUT = "batch_output"  # written by the gateway: a batch's output or error file


class StoredFile(Entity, table=True):
    """A file kept whole in the database: JSONL is text, and batch inputs are bounded."""

    __tablename__ = "files"
    __table_args__ = (sa.Index("ix_files_owner_key_id_created_at", "owner_key_id", "created_at"),)

    id: str = pk()
    owner_key_id: str | None = text(None, max_length=64)
    owner_team_id: str | None = text(None, max_length=64)
    purpose: FilePurpose = choice(FilePurpose)
    filename: str = text(max_length=255)
    size_bytes: int = big()
    content: str = text()


class BatchStatus(StrEnum):
    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


# Stored while the batch's requests may still run; every other stored status is final.
ACTIVE = (BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING)


class Batch(Entity, table=True):
    """An OpenAI-style batch: one parent job whose child jobs are the file's valid lines."""

    __tablename__ = "batches"
    __table_args__ = (
        sa.Index("ix_batches_owner_key_id_created_at", "owner_key_id", "created_at"),
        sa.Index("ix_batches_status_created_at", "status", "created_at"),
    )

    id: str = pk()
    owner_key_id: str | None = text(None, max_length=64)
    owner_team_id: str | None = text(None, max_length=64)
    endpoint: str = text(max_length=64)
    input_file_id: str = text(max_length=64)
    completion_window: str = text(max_length=16)
    status: BatchStatus = choice(BatchStatus)
    # The parent job; not a foreign key, because finished jobs are purged and the batch stays.
    operation_id: str | None = text(None, max_length=64)
    output_file_id: str | None = text(None, max_length=64)
    error_file_id: str | None = text(None, max_length=64)
    # Batch-level errors (`{"code", "message", "param", "line"}`), set when the batch failed.
    errors: list[dict[str, Any]] | None = json_value()
    # Lines refused before running (bad JSON, missing or duplicate custom_id…), one per line.
    line_errors: list[dict[str, Any]] = json_list()
    request_total: int = 0
    request_completed: int = 0
    request_failed: int = 0
    meta: dict[str, str] | None = json_value()
    in_progress_at: datetime | None = instant()
    expires_at: datetime | None = instant()
    finalizing_at: datetime | None = instant()
    completed_at: datetime | None = instant()
    failed_at: datetime | None = instant()
    expired_at: datetime | None = instant()
    cancelling_at: datetime | None = instant()
    cancelled_at: datetime | None = instant()

"""Files and batches: JSONL uploads, and batches whose lines run as child jobs of one parent."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
from pydantic import ValidationError

from app.batches.entities import (
    ACTIVE,
    Batch,
    BatchStatus,
    FilePurpose,
    StoredFile,
)
from app.core.clock import utcnow
from app.core.error_status import code_status
from app.core.errors import Conflict, InvalidInput, NotFound, StaleVersion
from app.core.events import EventSink
from app.core.ids import check_prefixed, new_id
from app.core.jsonvalues import escaped, has_lone_surrogate
from app.gateway.schemas import ChatCompletionRequest, EmbeddingRequest
from app.operations.entities import Operation, OperationStatus
from app.operations.service import ChildSpec, OperationService, cancel_in
from app.operations.submit import Owner
from app.operations.transitions import TERMINAL
from app.queue.names import OperationKind
from app.storage.mapping import encode_cursor
from app.storage.protocol import Page, Storage, UnitOfWork, Where
from app.storage.reads import read_page

log = logging.getLogger(__name__)

FILE_ID_PREFIX = "file"
BATCH_ID_PREFIX = "batch"
COMPLETION_WINDOWS = {"24h": timedelta(hours=24)}
METADATA_MAX_PAIRS, METADATA_MAX_KEY, METADATA_MAX_VALUE = 16, 64, 512


@dataclass(frozen=True)
class BatchEndpoint:
    """A URL batch lines may call: how its body is checked, and the job kind that runs it."""

    url: str
    request: type[ChatCompletionRequest] | type[EmbeddingRequest]
    kind: OperationKind


ENDPOINTS: dict[str, BatchEndpoint] = {
    "/v1/chat/completions": BatchEndpoint(
        "/v1/chat/completions", ChatCompletionRequest, OperationKind.CHAT_COMPLETION
    ),
    "/v1/embeddings": BatchEndpoint("/v1/embeddings", EmbeddingRequest, OperationKind.EMBEDDING),
}


def check_file_id(value: str, *, param: str = "file_id") -> str:
    return check_prefixed("file", FILE_ID_PREFIX, value, param=param)


def check_batch_id(value: str, *, param: str = "batch_id") -> str:
    return check_prefixed("batch", BATCH_ID_PREFIX, value, param=param)


def _id_cursor(created_at: datetime, entity_id: str) -> str:
    """The storage cursor after one item of a newest-first list (OpenAI pages by object id)."""
    return encode_cursor(
        [("created_at", True), ("id", True)], {"created_at": created_at, "id": entity_id}
    )


def _jsonl(records: Sequence[dict[str, Any]]) -> str:
    return "".join(orjson.dumps(r).decode() + "\n" for r in records)


class FileService:
    """Files a key uploads (batch input) or the gateway writes (batch output), owner-scoped."""

    def __init__(self, storage: Storage, *, max_bytes: int) -> None:
        self._storage = storage
        self._max_bytes = max_bytes

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    async def upload(
        self, *, owner: Owner, filename: str, purpose: str, content: bytes
    ) -> StoredFile:
        """Keep a JSONL batch input: UTF-8, within the size limit, with JSON objects as lines.

        A file with some malformed lines is accepted: a batch reports each of them in its error
        file. A file without a single JSON object line is not JSONL and is refused.
        """
        if purpose != FilePurpose.BATCH:
            raise InvalidInput(
                f"purpose '{purpose}' is not supported; this gateway accepts files for 'batch'",
                param="purpose",
            )
        if len(content) > self._max_bytes:
            raise InvalidInput(
                f"the file is {len(content)} bytes; the limit is {self._max_bytes} bytes",
                param="file",
            )
        try:
            text = content.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInput("the file must be UTF-8 encoded JSONL", param="file") from exc
        if not any(_is_object(line) for line in text.splitlines() if line.strip()):
            raise InvalidInput(
                "the file is not JSONL: no line holds a JSON object "
                '(expected one request per line, e.g. {"custom_id": "1", "method": "POST", ...})',
                param="file",
            )
        stored = StoredFile(
            id=new_id(FILE_ID_PREFIX),
            owner_key_id=owner.key_id,
            owner_team_id=owner.team_id,
            purpose=FilePurpose.BATCH,
            filename=(filename or "upload.jsonl")[:255],
            size_bytes=len(content),
            content=text,
        )
        async with self._storage.unit_of_work() as uow:
            await uow.repo(StoredFile).add(stored)
            await uow.commit()
        return stored

    async def get(self, file_id: str, *, owner: Owner, param: str = "file_id") -> StoredFile:
        """The file if the owner's key stored it (else `NotFound`, never a hint)."""
        check_file_id(file_id, param=param)
        async with self._storage.unit_of_work() as uow:
            stored = await uow.repo(StoredFile).get(file_id)
        if stored is None or stored.owner_key_id != owner.key_id:
            raise NotFound("file", file_id, param=param)
        return stored

    async def list_files(
        self,
        *,
        owner: Owner,
        purpose: str | None = None,
        limit: int = 20,
        after: str | None = None,
    ) -> Page[StoredFile]:
        """The owner's files, newest first; `after` is the id of the last file already seen."""
        where = [Where.eq("owner_key_id", owner.key_id)]
        if purpose is not None:
            where.append(Where.eq("purpose", purpose))
        cursor = None
        if after is not None:
            last = await self.get(after, owner=owner, param="after")
            cursor = _id_cursor(last.created_at, last.id)
        return await read_page(
            self._storage, StoredFile, *where, order_by=["-created_at"], limit=limit, after=cursor
        )

    async def delete(self, file_id: str, *, owner: Owner) -> StoredFile:
        """Remove the owner's file; batches already created from it keep their requests."""
        stored = await self.get(file_id, owner=owner)
        async with self._storage.unit_of_work() as uow:
            await uow.repo(StoredFile).delete(stored.id)
            await uow.commit()
        return stored


def _load_line(line: str) -> Any:
    """One JSONL line's value, read as the API reads a request body.

    orjson refuses what Python's parser (the API's) reads: a lone surrogate escape (`\\ud800`),
    1e309, NaN. Such a line is read all the same, so the check that follows refuses it naming
    the field, as the API would, rather than calling the whole line invalid JSON.
    """
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        try:
            return json.loads(line)
        except (ValueError, RecursionError):
            pass
        raise


def _is_object(line: str) -> bool:
    try:
        return isinstance(_load_line(line), dict)
    except orjson.JSONDecodeError:
        return False


@dataclass(frozen=True)
class ParsedLine:
    line: int
    custom_id: str
    body: dict[str, Any]


@dataclass(frozen=True)
class BatchView:
    """A batch as clients see it: the row, plus live counts and status while it runs."""

    batch: Batch
    status: BatchStatus
    completed: int
    failed: int
    finalizing_at: datetime | None


class BatchService:
    """OpenAI-style batches: each valid line a child job, results written as JSONL files."""

    def __init__(
        self,
        storage: Storage,
        operations: OperationService,
        files: FileService,
        events: EventSink,
        *,
        max_requests: int = 50_000,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._storage = storage
        self._operations = operations
        self._files = files
        self._events = events
        self._max_requests = max_requests
        self._clock = clock

    # ---- create --------------------------------------------------------------------------

    async def create(
        self,
        *,
        owner: Owner,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        metadata: dict[str, str] | None = None,
    ) -> BatchView:
        """Check the input file line by line and start a child job for every valid line.

        Invalid lines are kept for the error file; a batch without a single line, or with more
        lines than the limit, is created `failed` with the reason in `errors`.
        """
        target = ENDPOINTS.get(endpoint)
        if target is None:
            raise InvalidInput(
                f"endpoint '{endpoint}' is not supported; use one of {', '.join(ENDPOINTS)}",
                param="endpoint",
            )
        window = COMPLETION_WINDOWS.get(completion_window)
        if window is None:
            raise InvalidInput(
                f"completion_window '{completion_window}' is not supported; use "
                + ", ".join(COMPLETION_WINDOWS),
                param="completion_window",
            )
        _check_metadata(metadata)
        source = await self._files.get(input_file_id, owner=owner, param="input_file_id")
        if source.purpose != FilePurpose.BATCH:
            raise InvalidInput(
                f"file '{input_file_id}' was not uploaded with purpose 'batch'",
                param="input_file_id",
            )
        now = self._clock()
        batch = Batch(
            id=new_id(BATCH_ID_PREFIX),
            owner_key_id=owner.key_id,
            owner_team_id=owner.team_id,
            endpoint=endpoint,
            input_file_id=input_file_id,
            completion_window=completion_window,
            status=BatchStatus.IN_PROGRESS,
            meta=metadata,
            created_at=now,
            updated_at=now,
            in_progress_at=now,
            expires_at=now + window,
        )
        # Checking up to 50,000 lines is CPU work: off the event loop, so other requests flow.
        valid, invalid, total = await asyncio.to_thread(_parse_lines, source.content, target)
        batch.request_total = total
        batch.line_errors = invalid
        if total == 0 or total > self._max_requests:
            return await self._create_failed(batch, total)
        if not valid:
            # Nothing to run: the batch is complete at once, with every line in its error file.
            async with self._storage.unit_of_work() as uow:
                await self._write_outcome(uow, batch, [], now, added=True)
                await uow.commit()
            return self._view(batch, None)
        children = [
            ChildSpec(
                kind=target.kind,
                input=line.body,
                meta={"batch_id": batch.id, "custom_id": line.custom_id, "line": line.line},
            )
            for line in valid
        ]

        async def attach(uow: UnitOfWork, parent: Operation) -> None:
            batch.operation_id = parent.id
            await uow.repo(Batch).add(batch)

        parent = await self._operations.submit_parent(
            kind=OperationKind.BATCH,
            input={"batch_id": batch.id, "input_file_id": input_file_id, "endpoint": endpoint},
            owner=owner,
            children=children,
            meta={"batch_id": batch.id},
            attach=attach,
        )
        return self._view(batch, parent)

    async def _create_failed(self, batch: Batch, total: int) -> BatchView:
        if total == 0:
            error = {"code": "empty_file", "message": "the input file holds no request lines"}
        else:
            error = {
                "code": "too_many_requests",
                "message": f"the input file holds {total} requests; a batch takes at most "
                f"{self._max_requests}",
            }
        batch.status = BatchStatus.FAILED
        batch.errors = [{**error, "param": "input_file_id", "line": None}]
        batch.failed_at = batch.created_at
        batch.request_total = batch.request_failed = 0
        batch.line_errors = []
        async with self._storage.unit_of_work() as uow:
            await uow.repo(Batch).add(batch)
            await self._events.record(uow, "batch.failed", _event_data(batch))
            await uow.commit()
        return self._view(batch, None)

    # ---- read ----------------------------------------------------------------------------

    async def get(self, batch_id: str, *, owner: Owner, param: str = "batch_id") -> BatchView:
        """The batch if the owner's key created it (else `NotFound`)."""
        check_batch_id(batch_id, param=param)
        async with self._storage.unit_of_work() as uow:
            batch = await uow.repo(Batch).get(batch_id)
            if batch is None or batch.owner_key_id != owner.key_id:
                raise NotFound("batch", batch_id, param=param)
            parent = await self._parent(uow, batch)
        return self._view(batch, parent)

    async def list_batches(
        self, *, owner: Owner, limit: int = 20, after: str | None = None
    ) -> tuple[list[BatchView], bool]:
        """The owner's batches, newest first, and whether more follow; `after` is a batch id."""
        cursor = None
        if after is not None:
            last = await self.get(after, owner=owner, param="after")
            cursor = _id_cursor(last.batch.created_at, last.batch.id)
        async with self._storage.unit_of_work() as uow:
            page = await uow.repo(Batch).find(
                Where.eq("owner_key_id", owner.key_id),
                order_by=["-created_at"],
                limit=limit,
                after=cursor,
            )
            running = [b.operation_id for b in page.items if b.status in ACTIVE and b.operation_id]
            parents = {p.id: p for p in await uow.repo(Operation).get_many(running)}
        views = [self._view(b, parents.get(b.operation_id or "")) for b in page.items]
        return views, page.next_cursor is not None

    async def _parent(self, uow: UnitOfWork, batch: Batch) -> Operation | None:
        if batch.status not in ACTIVE or batch.operation_id is None:
            return None
        return await uow.repo(Operation).get(batch.operation_id)

    def _view(self, batch: Batch, parent: Operation | None) -> BatchView:
        status, finalizing_at = BatchStatus(batch.status), batch.finalizing_at
        completed, failed = batch.request_completed, batch.request_failed
        if batch.status in ACTIVE and parent is not None:
            completed = parent.children_completed
            failed = len(batch.line_errors) + parent.children_failed
            if batch.status == BatchStatus.IN_PROGRESS and parent.status in TERMINAL:
                # Every request has run; the result files are being written.
                status, finalizing_at = BatchStatus.FINALIZING, parent.finished_at
        return BatchView(batch, status, completed, failed, finalizing_at)

    # ---- cancel --------------------------------------------------------------------------

    async def cancel(self, batch_id: str, *, owner: Owner) -> BatchView:
        """Stop the batch's unfinished requests; those already answered stay in its output."""
        check_batch_id(batch_id)
        while True:
            try:
                async with self._storage.unit_of_work() as uow:
                    batch = await uow.repo(Batch).get(batch_id)
                    if batch is None or batch.owner_key_id != owner.key_id:
                        raise NotFound("batch", batch_id, param="batch_id")
                    if batch.status in (BatchStatus.CANCELLING, BatchStatus.CANCELLED):
                        parent = await self._parent(uow, batch)
                        return self._view(batch, parent)
                    parent = await self._parent(uow, batch)
                    if batch.status != BatchStatus.IN_PROGRESS or (
                        parent is not None and parent.status in TERMINAL
                    ):
                        shown = self._view(batch, parent).status.value
                        raise Conflict(
                            f"batch '{batch_id}' is {shown}; only a batch in progress can be "
                            "cancelled",
                            param="batch_id",
                        )
                    batch.status = BatchStatus.CANCELLING
                    batch.cancelling_at = self._clock()
                    batch = await uow.repo(Batch).update(batch)
                    if parent is not None:
                        parent = await cancel_in(uow, parent.id)
                    await uow.commit()
                return self._view(batch, parent)
            except StaleVersion:
                continue  # a child finished meanwhile: look again

    # ---- finalize and expire (periodic) --------------------------------------------------

    async def process_due(self, *, page_size: int = 200) -> int:
        """Write the results of batches whose requests are done, and expire overdue ones.

        Runs periodically; walks every batch still active (few at any time), so none waits
        behind others. Returns how many batches it finished.
        """
        finished = 0
        cursor: str | None = None
        while True:
            async with self._storage.unit_of_work() as uow:
                page = await uow.repo(Batch).find(
                    Where.in_("status", list(ACTIVE)),
                    order_by=["created_at"],
                    limit=page_size,
                    after=cursor,
                )
                ids = [b.operation_id for b in page.items if b.operation_id]
                parents = {p.id: p for p in await uow.repo(Operation).get_many(ids)}
            now = self._clock()
            for batch in page.items:
                parent = parents.get(batch.operation_id or "")
                try:
                    if parent is not None and parent.status not in TERMINAL:
                        if batch.expires_at is None or batch.expires_at > now:
                            continue
                        await self._expire(batch.id)
                    if await self.finalize(batch.id):
                        finished += 1
                except Exception:
                    log.exception("batch %s could not be finished; next tick retries", batch.id)
            if page.next_cursor is None:
                return finished
            cursor = page.next_cursor

    async def _expire(self, batch_id: str) -> None:
        """Cancel what is left of an overdue batch; `finalize` then reports it expired."""
        while True:
            try:
                async with self._storage.unit_of_work() as uow:
                    batch = await uow.repo(Batch).get(batch_id)
                    if batch is None or batch.status not in ACTIVE or batch.operation_id is None:
                        return
                    parent = await uow.repo(Operation).get(batch.operation_id)
                    if parent is None or parent.status in TERMINAL:
                        return
                    batch.expired_at = self._clock()
                    await uow.repo(Batch).update(batch)
                    await cancel_in(uow, parent.id)
                    await uow.commit()
                    return
            except StaleVersion:
                continue

    async def finalize(self, batch_id: str) -> bool:
        """If every request of the batch has finished, write its output and error files.

        One unit of work writes the files, the final status and the event, so a batch is
        either still finalizing or finished with all three. False when there was nothing to do
        (or another process finished it first).
        """
        try:
            async with self._storage.unit_of_work() as uow:
                batch = await uow.repo(Batch).get(batch_id)
                if batch is None or batch.status not in ACTIVE:
                    return False
                parent = await self._parent(uow, batch)
                if parent is not None and parent.status not in TERMINAL:
                    return False
                children = await self._children(uow, parent.id) if parent is not None else []
                finished_at = parent.finished_at if parent is not None else None
                await self._write_outcome(uow, batch, children, finished_at or self._clock())
                await uow.commit()
        except StaleVersion:
            return False
        return True

    async def _children(self, uow: UnitOfWork, parent_id: str) -> list[Operation]:
        children: list[Operation] = []
        cursor: str | None = None
        while True:
            page = await uow.repo(Operation).find(
                Where.eq("parent_id", parent_id), order_by=["created_at"], limit=1000, after=cursor
            )
            children.extend(page.items)
            if page.next_cursor is None:
                return children
            cursor = page.next_cursor

    async def _write_outcome(
        self,
        uow: UnitOfWork,
        batch: Batch,
        children: list[Operation],
        finalizing_at: datetime,
        *,
        added: bool = False,
    ) -> None:
        """Inside `uow`: the result files, the final status and counts, and the event."""
        if batch.expired_at is not None:
            final, unrun = BatchStatus.EXPIRED, "batch_expired"
        elif batch.status == BatchStatus.CANCELLING:
            final, unrun = BatchStatus.CANCELLED, "batch_cancelled"
        else:
            final, unrun = BatchStatus.COMPLETED, "batch_cancelled"
        outputs: list[tuple[int, dict[str, Any]]] = []
        errors: list[tuple[int, dict[str, Any]]] = [
            (int(e.get("line") or 0), _refused_line(batch.id, e)) for e in batch.line_errors
        ]
        for child in children:
            line = int(child.meta.get("line", 0))
            if child.status == OperationStatus.COMPLETED:
                outputs.append((line, _answered_line(child)))
            else:
                errors.append((line, _failed_line(child, unrun)))
        now = self._clock()
        owner = Owner(key_id=batch.owner_key_id, team_id=batch.owner_team_id)
        if outputs:
            batch.output_file_id = await self._add_result_file(
                uow, owner, f"{batch.id}_output.jsonl", [r for _, r in sorted(outputs, key=_first)]
            )
        if errors:
            batch.error_file_id = await self._add_result_file(
                uow, owner, f"{batch.id}_error.jsonl", [r for _, r in sorted(errors, key=_first)]
            )
        batch.request_completed = len(outputs)
        batch.request_failed = len(errors)
        batch.finalizing_at = finalizing_at
        batch.status = final
        if final == BatchStatus.COMPLETED:
            batch.completed_at = now
        elif final == BatchStatus.CANCELLED:
            batch.cancelled_at = now
        batch.updated_at = now
        repo = uow.repo(Batch)
        if added:
            await repo.add(batch)
        else:
            batch = await repo.update(batch)
        await self._events.record(uow, f"batch.{final.value}", _event_data(batch))

    async def _add_result_file(
        self, uow: UnitOfWork, owner: Owner, filename: str, records: list[dict[str, Any]]
    ) -> str:
        content = _jsonl(records)
        stored = StoredFile(
            id=new_id(FILE_ID_PREFIX),
            owner_key_id=owner.key_id,
            owner_team_id=owner.team_id,
            purpose=FilePurpose.BATCH_OUTPUT,
            filename=filename,
            size_bytes=len(content.encode()),
            content=content,
        )
        await uow.repo(StoredFile).add(stored)
        return stored.id


def _event_data(batch: Batch) -> dict[str, Any]:
    """The `data` of a `batch.*` event: the batch's outcome and where its files are."""
    return {
        "id": batch.id,
        "object": "batch",
        "status": BatchStatus(batch.status).value,
        "endpoint": batch.endpoint,
        "input_file_id": batch.input_file_id,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "errors": batch.errors,
        "request_counts": {
            "total": batch.request_total,
            "completed": batch.request_completed,
            "failed": batch.request_failed,
        },
        "metadata": batch.meta,
        "owner_key_id": batch.owner_key_id,
    }


def _first(item: tuple[int, dict[str, Any]]) -> int:
    return item[0]


def _request_id(seed: str) -> str:
    return "batch_req_" + seed.replace("-", "")[-32:]


def _answered_line(child: Operation) -> dict[str, Any]:
    return {
        "id": _request_id(child.id),
        "custom_id": child.meta.get("custom_id"),
        "response": {"status_code": 200, "request_id": child.id, "body": child.result},
        "error": None,
    }


def _failed_line(child: Operation, unrun_code: str) -> dict[str, Any]:
    base = {"id": _request_id(child.id), "custom_id": child.meta.get("custom_id")}
    if child.status == OperationStatus.CANCELLED:
        message = (
            "the request did not run before the batch's completion window expired"
            if unrun_code == "batch_expired"
            else "the request did not run before the batch was cancelled"
        )
        return {**base, "response": None, "error": {"code": unrun_code, "message": message}}
    code = child.error_type or "internal_error"
    status, type_ = code_status(code)
    body = {
        "error": {"message": child.error_message or "", "type": type_, "param": None, "code": code}
    }
    return {
        **base,
        "response": {"status_code": status, "request_id": child.id, "body": body},
        "error": None,
    }


def _refused_line(batch_id: str, error: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": _request_id(f"{batch_id}{error.get('line', 0):08d}"),
        "custom_id": error.get("custom_id"),
        "response": None,
        "error": {
            "code": error["code"],
            "message": error["message"],
            "param": error.get("param"),
            "line": error.get("line"),
        },
    }


def _check_metadata(metadata: dict[str, str] | None) -> None:
    if metadata is None:
        return
    if len(metadata) > METADATA_MAX_PAIRS:
        raise InvalidInput(f"metadata holds at most {METADATA_MAX_PAIRS} pairs", param="metadata")
    for key, value in metadata.items():
        if len(key) > METADATA_MAX_KEY or len(value) > METADATA_MAX_VALUE:
            raise InvalidInput(
                f"metadata keys are at most {METADATA_MAX_KEY} characters and values at most "
                f"{METADATA_MAX_VALUE}",
                param=f"metadata.{key[:METADATA_MAX_KEY]}",
            )


def _parse_lines(
    content: str, target: BatchEndpoint
) -> tuple[list[ParsedLine], list[dict[str, Any]], int]:
    """The runnable lines, one error per refused line, and how many request lines there are."""
    valid: list[ParsedLine] = []
    invalid: list[dict[str, Any]] = []
    seen: set[str] = set()
    total = 0

    def refuse(
        number: int,
        code: str,
        message: str,
        *,
        param: str | None = None,
        custom_id: str | None = None,
    ) -> None:
        invalid.append(
            {
                "line": number,
                "code": code,
                "message": message,
                "param": param,
                "custom_id": custom_id,
            }
        )

    for number, raw in enumerate(content.splitlines(), start=1):
        if not raw.strip():
            continue
        total += 1
        try:
            record = _load_line(raw)
        except orjson.JSONDecodeError as exc:
            refuse(number, "invalid_json_line", f"line {number} is not valid JSON ({exc})")
            continue
        if not isinstance(record, dict):
            refuse(number, "invalid_json_line", f"line {number} is not a JSON object")
            continue
        custom_id = record.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            refuse(
                number,
                "missing_custom_id",
                f"line {number} has no custom_id string",
                param="custom_id",
            )
            continue
        if has_lone_surrogate(custom_id):
            refuse(
                number,
                "invalid_custom_id",
                f"line {number}: custom_id must not contain a lone UTF-16 surrogate",
                param="custom_id",
            )
            continue
        if custom_id in seen:
            refuse(
                number,
                "duplicate_custom_id",
                f"custom_id '{custom_id}' is used by an earlier line",
                param="custom_id",
                custom_id=custom_id,
            )
            continue
        seen.add(custom_id)
        if record.get("method") != "POST":
            refuse(
                number,
                "invalid_method",
                f"line {number}: method must be 'POST'",
                param="method",
                custom_id=custom_id,
            )
            continue
        if record.get("url") != target.url:
            refuse(
                number,
                "invalid_url",
                f"line {number}: url must be '{target.url}', the batch's endpoint",
                param="url",
                custom_id=custom_id,
            )
            continue
        checked = _check_body(record.get("body"), target)
        if isinstance(checked, tuple):
            param, message = checked
            refuse(
                number,
                "invalid_body",
                f"line {number}: {message}",
                param=param,
                custom_id=custom_id,
            )
            continue
        valid.append(ParsedLine(number, custom_id, checked))
    return valid, invalid, total


def _check_body(body: Any, target: BatchEndpoint) -> dict[str, Any] | tuple[str, str]:
    """The job input for `body` (as `?async=true` stores it), or why not (field, sentence)."""
    if not isinstance(body, dict):
        return "body", "body must be a JSON object"
    try:
        parsed = target.request.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(["body", *(escaped(str(p)) for p in first.get("loc", ()))])
        return field, f"{field}: {first.get('msg', 'invalid value')}"
    if getattr(parsed, "stream", None):
        return "body.stream", "body.stream: a batch request cannot be streamed"
    try:
        return parsed.check()
    except InvalidInput as exc:
        field = f"body.{exc.param}" if exc.param else "body"
        # A sentence may already start with the field it names.
        reason = exc.message.removeprefix(f"{exc.param}: ")
        return field, f"{field}: {reason}"

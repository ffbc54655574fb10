"""Knowledge bases: their documents ingested as jobs, and searched by their keys' holders.

A document is accepted in one transaction with its source and the job that ingests it (so a
202 always has a job behind it). The job parses and chunks the source, embeds the chunks in
batches through the gateway's one call path (billed to the job's owner), and stores each batch
with its embeddings as it goes: a job that runs again after a crash skips the chunks stored.
Only once every chunk is stored does the document become `ready`, and only ready documents are
searched, so a failed or unfinished ingestion is never half visible.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from app.access.permissions import Resource
from app.access.service import Principal
from app.core.errors import (
    Cancelled,
    Conflict,
    DomainError,
    InvalidInput,
    NotFound,
    StaleVersion,
    TooLarge,
)
from app.core.ids import new_id
from app.core.invalidation import InvalidationBus
from app.gateway.calls import (
    DIRECT,
    CallContext,
    Caller,
    CallSource,
    Embedded,
    GatewayCalls,
    Spent,
)
from app.gateway.schemas import EmbeddingRequest
from app.knowledge.chunking import Chunking, Piece, chunk
from app.knowledge.entities import (
    DocumentStatus,
    KnowledgeBase,
    KnowledgeBaseType,
    KnowledgeChunk,
    KnowledgeDocument,
    KnowledgeSource,
)
from app.knowledge.filters import parse_filter
from app.knowledge.grading import Gradable, Grading, Thresholds, grade
from app.knowledge.index import Hit, SearchIndex, pack
from app.knowledge.parsing import ParserKind, detect_parser, parse
from app.knowledge.schemas import (
    ChunkingSpec,
    KnowledgeBaseConfig,
    KnowledgeBaseCreate,
    KnowledgeBaseUpdate,
    SearchHit,
    SearchMode,
    SearchRequest,
    SearchResults,
)
from app.models.entities import Model, ModelKind
from app.operations.entities import Operation, OperationStatus
from app.operations.runner import describe, is_transient
from app.operations.service import OperationService
from app.operations.submit import Owner
from app.operations.transitions import TERMINAL
from app.queue.names import OperationKind
from app.storage.protocol import Increment, Page, Storage, UnitOfWork, Where, given
from app.storage.reads import get_existing, read_page

log = logging.getLogger(__name__)

# Items are a base's id: its searchable chunks (or the base itself) changed.
KNOWLEDGE_TOPIC = "knowledge"
DOCUMENT_ID_PREFIX = "doc"
# Reciprocal rank fusion's constant (Cormack et al.), and how deep each ranking goes.
RRF_K = 60
FUSION_DEPTH = 50


class _Superseded(Exception):
    """The document is no longer this job's: deleted, or handed to a newer job."""


@dataclass(frozen=True, slots=True)
class KnowledgeLimits:
    max_document_bytes: int = 8 * 1024 * 1024
    max_chunks: int = 20_000
    embed_batch: int = 64


@dataclass(frozen=True, slots=True)
class Upload:
    """One document to ingest, as given: its bytes and what the caller said of them."""

    content: bytes
    title: str | None = None
    description: str | None = None
    filename: str | None = None
    content_type: str | None = None
    parser: str | None = None
    metadata: dict[str, Any] | None = None
    chunking: ChunkingSpec | None = None


@dataclass(frozen=True, slots=True)
class Accepted:
    """A document accepted for ingestion, and the job that ingests it."""

    document: KnowledgeDocument
    operation: Operation


class Ingestion(Protocol):
    """What an ingestion sees of the job it runs in (`JobContext` is one)."""

    @property
    def operation(self) -> Operation: ...

    @property
    def attempt(self) -> int: ...

    async def checkpoint(self) -> None: ...

    async def set_progress(self, **progress: Any) -> None: ...


@dataclass(frozen=True, slots=True)
class Searched:
    """A search's results and what its query's embedding used (nothing for a keyword search)."""

    results: SearchResults
    spent: Spent = field(default_factory=Spent)


@dataclass(frozen=True, slots=True)
class ForBase:
    """A caller searching a base: allowed the base's embedding model whatever its key's model
    permissions say (the base's permission covers it); usage still goes to its key and team."""

    caller: Caller
    model: str

    @property
    def key_id(self) -> str | None:
        return self.caller.key_id

    @property
    def team_id(self) -> str | None:
        return self.caller.team_id

    def ensure_can_call(self, model: str, messages: Iterable[Any] = ()) -> None:
        if model != self.model:
            self.caller.ensure_can_call(model, messages)


def owner_of(principal: Principal) -> Owner:
    """Who an ingestion job runs for: the admin key (billed for its embeddings), or, for an
    administrator signed in with a session token, the gateway itself."""
    if principal.user_id is not None:
        return Owner(key_id=None, team_id=principal.team_id)
    return Owner(key_id=principal.key_id, team_id=principal.team_id)


def _config(base: KnowledgeBase) -> KnowledgeBaseConfig:
    return KnowledgeBaseConfig.model_validate(base.config)


def _held(operation_id: str) -> tuple[Where, Where]:
    """The conditions of a write an ingestion makes: the document is still its own."""
    return Where.eq("operation_id", operation_id), Where.eq("status", DocumentStatus.PROCESSING)


class KnowledgeService:
    """Knowledge bases, their documents and chunks; ingestion jobs; searches."""

    def __init__(
        self,
        storage: Storage,
        operations: OperationService,
        calls: GatewayCalls,
        index: SearchIndex,
        *,
        bus: InvalidationBus | None = None,
        limits: KnowledgeLimits | None = None,
    ) -> None:
        self._storage = storage
        self._operations = operations
        self._calls = calls
        self.index = index
        self._bus = bus or InvalidationBus(None, shared=False)
        self.limits = limits or KnowledgeLimits()
        # Searches read the base's row each time (one key lookup): its `index_version` tells a
        # stale matrix wherever the change was made; the bus has matrices refreshed at once.
        self._bus.on(KNOWLEDGE_TOPIC, self.index.changed)

    def _changed_after_commit(self, uow: UnitOfWork, base_id: str) -> None:
        """Tell every process, once `uow` commits, that the base's searchable chunks changed."""
        uow.on_commit(lambda: self._bus.publish(KNOWLEDGE_TOPIC, base_id))

    @staticmethod
    async def _step_index(uow: UnitOfWork, base_id: str) -> None:
        """Inside `uow`: a new `index_version`, so cached snapshots of the base are stale."""
        await uow.repo(KnowledgeBase).write_where(base_id, {"index_version": Increment(1)})

    # ---- bases -------------------------------------------------------------------------------

    async def _embedding_model(self, uow: UnitOfWork, model_id: str) -> Model:
        model = await uow.repo(Model).get(model_id)
        if model is None:
            raise InvalidInput(f"model '{model_id}' does not exist", param="embedding_model")
        if model.kind is not ModelKind.EMBEDDING:
            raise InvalidInput(
                f"model '{model_id}' is a {model.kind.value} model; a knowledge base needs an "
                "embedding model",
                param="embedding_model",
            )
        if not model.enabled:
            raise InvalidInput(f"model '{model_id}' is disabled", param="embedding_model")
        return model

    async def create_base(self, data: KnowledgeBaseCreate) -> KnowledgeBase:
        """A new, empty knowledge base embedding with `data.embedding_model`."""
        config = KnowledgeBaseConfig(
            default_top_k=data.default_top_k,
            default_min_score=data.default_min_score,
            chunking=data.chunking,
            request_dimensions=data.embedding_dimensions is not None,
        )
        base = KnowledgeBase(
            id=data.id,
            name=data.name,
            description=data.description,
            kb_type=KnowledgeBaseType.BUILTIN,
            embedding_model_id=data.embedding_model,
            embedding_dimensions=data.embedding_dimensions,
            config=config.model_dump(mode="json"),
            enabled=data.enabled,
        )
        async with self._storage.unit_of_work() as uow:
            await self._embedding_model(uow, data.embedding_model)
            if await uow.repo(KnowledgeBase).get(data.id) is not None:
                raise Conflict(f"knowledge base '{data.id}' already exists", param="id")
            base = await uow.repo(KnowledgeBase).add(base)
            await uow.commit()
        return base

    async def list_bases(self, *, limit: int, after: str | None) -> Page[KnowledgeBase]:
        return await read_page(
            self._storage, KnowledgeBase, order_by=["id"], limit=limit, after=after
        )

    async def get_base(self, base_id: str) -> KnowledgeBase:
        async with self._storage.unit_of_work() as uow:
            return await get_existing(uow.repo(KnowledgeBase), base_id, "knowledge base")

    async def update_base(self, base_id: str, data: KnowledgeBaseUpdate) -> KnowledgeBase:
        """Change a base's name, description, defaults or enabled flag."""
        while True:
            try:
                async with self._storage.unit_of_work() as uow:
                    base = await get_existing(uow.repo(KnowledgeBase), base_id, "knowledge base")
                    config = _config(base)
                    given_fields = data.model_fields_set
                    if "name" in given_fields and data.name is not None:
                        base.name = data.name
                    if "description" in given_fields:
                        base.description = data.description
                    if "enabled" in given_fields and data.enabled is not None:
                        base.enabled = data.enabled
                    if data.chunking is not None:
                        config.chunking = data.chunking
                    if data.default_top_k is not None:
                        config.default_top_k = data.default_top_k
                    if "default_min_score" in given_fields:
                        config.default_min_score = data.default_min_score
                    base.config = config.model_dump(mode="json")
                    base = await uow.repo(KnowledgeBase).update(base)
                    self._changed_after_commit(uow, base_id)
                    await uow.commit()
                return base
            except StaleVersion:
                continue

    async def delete_base(self, base_id: str) -> None:
        """Remove a base with its documents, sources and chunks."""
        async with self._storage.unit_of_work() as uow:
            await get_existing(uow.repo(KnowledgeBase), base_id, "knowledge base")
            # Chunks reference their document, documents their base: one delete cascades.
            await uow.repo(KnowledgeBase).delete(base_id)
            self._changed_after_commit(uow, base_id)
            await uow.commit()

    # ---- documents ---------------------------------------------------------------------------

    def _check(
        self, upload: Upload, base: KnowledgeBase, *, param: str, parser_param: str
    ) -> tuple[ParserKind, Chunking]:
        """The parser and chunking of an upload, its size checked (a 413 naming `param`)."""
        size = len(upload.content)
        limit = self.limits.max_document_bytes
        if size > limit:
            raise TooLarge(f"the document has {size} bytes; the limit is {limit}", param=param)
        if size == 0:
            raise InvalidInput("the document is empty", param=param)
        try:
            kind = detect_parser(upload.parser, upload.filename, upload.content_type)
        except InvalidInput as exc:
            raise InvalidInput(exc.message, param=parser_param) from None
        spec = upload.chunking or _config(base).chunking
        return kind, spec.chunking()

    def _pieces(self, kind: ParserKind, content: bytes, chunking: Chunking) -> list[Piece]:
        """The chunks of a source; a 400 when it cannot be read or gives too many."""
        pieces = chunk(parse(kind, content), chunking)
        if not pieces:
            raise InvalidInput("the document has no text to index", param="content")
        if len(pieces) > self.limits.max_chunks:
            raise InvalidInput(
                f"the document gives {len(pieces)} chunks; at most {self.limits.max_chunks} are "
                "allowed (use larger chunks, or split the document)",
                param="content",
            )
        return pieces

    async def add_documents(
        self, base_id: str, uploads: Sequence[Upload], *, owner: Owner, param: str = "files"
    ) -> list[Accepted]:
        """Accept documents for ingestion: each committed with its source and its job, all or
        none; each is parsed and chunked first, so one that cannot be is refused at once."""
        base = await self.get_base(base_id)
        if not uploads:
            raise InvalidInput("no document was given", param=param)
        checked = []
        for index, upload in enumerate(uploads):
            # One JSON document's errors name its fields; an upload's name the file.
            single = param == "content"
            where = param if single else f"{param}.{index}"
            kind, chunking = self._check(
                upload, base, param=where, parser_param="parser" if single else where
            )
            try:
                await asyncio.to_thread(self._pieces, kind, upload.content, chunking)
            except InvalidInput as exc:
                message = exc.message if single else f"{where} ({upload.filename}): {exc.message}"
                raise InvalidInput(message, param=where) from None
            checked.append((upload, kind, chunking))
        accepted: list[Accepted] = []
        async with self._storage.unit_of_work() as uow:
            await get_existing(uow.repo(KnowledgeBase), base_id, "knowledge base")
            for upload, kind, chunking in checked:
                document_id = new_id(DOCUMENT_ID_PREFIX)
                operation = await self._operations.jobs.submit_in(
                    uow,
                    kind=OperationKind.KNOWLEDGE_INGESTION,
                    input={"knowledge_base_id": base_id, "document_id": document_id},
                    owner=owner,
                )
                document = KnowledgeDocument(
                    id=document_id,
                    knowledge_base_id=base_id,
                    title=upload.title or upload.filename or "Untitled document",
                    description=upload.description,
                    source_filename=upload.filename,
                    content_type=upload.content_type,
                    original_size_bytes=len(upload.content),
                    meta=dict(upload.metadata or {}),
                    status=DocumentStatus.PENDING,
                    operation_id=operation.id,
                    parser=kind.value,
                    chunking={
                        "strategy": chunking.strategy.value,
                        "chunk_size": chunking.size,
                        "chunk_overlap": chunking.overlap,
                    },
                )
                document = await uow.repo(KnowledgeDocument).add(document)
                await uow.repo(KnowledgeSource).add(
                    KnowledgeSource(document_id=document_id, content=upload.content)
                )
                accepted.append(Accepted(document, operation))
            await uow.commit()
        return accepted

    async def wait(self, accepted: Sequence[Accepted], *, timeout: float) -> list[Accepted]:  # noqa: ASYNC109
        """The documents once their jobs finished, or as they stand after `timeout` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        admin = Owner(key_id=None, admin=True)
        finished: list[Accepted] = []
        for item in accepted:
            remaining = max(0.0, deadline - loop.time())
            operation = await self._operations.wait(
                item.operation.id, owner=admin, timeout=remaining
            )
            document = await self.get_document(item.document.knowledge_base_id, item.document.id)
            finished.append(Accepted(document, operation))
        return finished

    async def list_documents(
        self,
        base_id: str,
        *,
        status: DocumentStatus | None = None,
        limit: int,
        after: str | None,
    ) -> Page[KnowledgeDocument]:
        async with self._storage.unit_of_work() as uow:
            await get_existing(uow.repo(KnowledgeBase), base_id, "knowledge base")
            page = await uow.repo(KnowledgeDocument).find(
                Where.eq("knowledge_base_id", base_id),
                *given(Where.eq("status", status)),
                order_by=["-created_at"],
                limit=limit,
                after=after,
            )
            jobs = await self._jobs_of(uow, page.items)
        return Page(
            [self._as_seen(d, jobs.get(d.operation_id or "")) for d in page.items], page.next_cursor
        )

    async def get_document(self, base_id: str, document_id: str) -> KnowledgeDocument:
        """The document, its status as its job left it (a job that died with its last attempt,
        or was cancelled before it ran, leaves it failed)."""
        document, _ = await self.document_with_job(base_id, document_id)
        return document

    async def document_with_job(
        self, base_id: str, document_id: str
    ) -> tuple[KnowledgeDocument, Operation | None]:
        async with self._storage.unit_of_work() as uow:
            document = await self._document(uow, base_id, document_id)
            jobs = await self._jobs_of(uow, [document])
        operation = jobs.get(document.operation_id or "")
        return self._as_seen(document, operation), operation

    @staticmethod
    async def _document(uow: UnitOfWork, base_id: str, document_id: str) -> KnowledgeDocument:
        document = await uow.repo(KnowledgeDocument).get(document_id)
        if document is None or document.knowledge_base_id != base_id:
            raise NotFound("document", document_id, param="document_id")
        return document

    @staticmethod
    async def _jobs_of(
        uow: UnitOfWork, documents: Sequence[KnowledgeDocument]
    ) -> dict[str, Operation]:
        unfinished = [
            d.operation_id
            for d in documents
            if d.operation_id and d.status in (DocumentStatus.PENDING, DocumentStatus.PROCESSING)
        ]
        if not unfinished:
            return {}
        return {o.id: o for o in await uow.repo(Operation).get_many(unfinished)}

    @staticmethod
    def _as_seen(document: KnowledgeDocument, operation: Operation | None) -> KnowledgeDocument:
        if (
            operation is not None
            and document.status in (DocumentStatus.PENDING, DocumentStatus.PROCESSING)
            and operation.status in TERMINAL
            and operation.status is not OperationStatus.COMPLETED
        ):
            seen = document.model_copy()
            seen.status = DocumentStatus.FAILED
            seen.error = (
                f"ingestion {operation.status.value}: {operation.error_message or ''}".strip()
            )
            return seen
        return document

    async def list_chunks(
        self, base_id: str, document_id: str, *, limit: int, after: str | None
    ) -> Page[KnowledgeChunk]:
        async with self._storage.unit_of_work() as uow:
            await self._document(uow, base_id, document_id)
            return await uow.repo(KnowledgeChunk).find(
                Where.eq("document_id", document_id),
                order_by=["chunk_index"],
                limit=limit,
                after=after,
            )

    async def set_disabled(
        self, base_id: str, document_id: str, disabled: bool
    ) -> KnowledgeDocument:
        """Leave a document out of searches (or bring it back); its chunks stay stored."""
        while True:
            try:
                async with self._storage.unit_of_work() as uow:
                    document = await self._document(uow, base_id, document_id)
                    if document.disabled == disabled:
                        return document
                    document.disabled = disabled
                    document = await uow.repo(KnowledgeDocument).update(document)
                    if document.status is DocumentStatus.READY:
                        await self._step_index(uow, base_id)
                        self._changed_after_commit(uow, base_id)
                    await uow.commit()
                return document
            except StaleVersion:
                continue

    async def delete_document(self, base_id: str, document_id: str) -> None:
        """Remove a document with its source and chunks; a job ingesting it stops."""
        async with self._storage.unit_of_work() as uow:
            document = await self._document(uow, base_id, document_id)
            await uow.repo(KnowledgeDocument).delete(document_id)
            if document.status is DocumentStatus.READY:
                await self._step_index(uow, base_id)
                self._changed_after_commit(uow, base_id)
            await uow.commit()

    async def reindex_document(
        self, base_id: str, document_id: str, *, owner: Owner, chunking: ChunkingSpec | None = None
    ) -> Accepted:
        """Ingest a document again from its kept source (with new chunking, if given)."""
        async with self._storage.unit_of_work() as uow:
            await get_existing(uow.repo(KnowledgeBase), base_id, "knowledge base")
            document = await self._document(uow, base_id, document_id)
            accepted = await self._reset(uow, document, owner, chunking)
            await uow.commit()
        return accepted

    async def reindex_base(
        self,
        base_id: str,
        *,
        owner: Owner,
        embedding_model: str | None = None,
        embedding_dimensions: int | None = None,
        chunking: ChunkingSpec | None = None,
    ) -> list[Accepted]:
        """Ingest every document of the base again, after switching its embedding model (and
        dimensions) when given: until each is ready again, it is out of searches."""
        async with self._storage.unit_of_work() as uow:
            base = await get_existing(uow.repo(KnowledgeBase), base_id, "knowledge base")
            config = _config(base)
            if embedding_model is not None:
                await self._embedding_model(uow, embedding_model)
                base.embedding_model_id = embedding_model
                base.embedding_dimensions = embedding_dimensions
                config.request_dimensions = embedding_dimensions is not None
            elif embedding_dimensions is not None:
                base.embedding_dimensions = embedding_dimensions
                config.request_dimensions = True
            if chunking is not None:
                config.chunking = chunking
            base.config = config.model_dump(mode="json")
            base.index_version += 1
            await uow.repo(KnowledgeBase).update(base)
            documents = await uow.repo(KnowledgeDocument).find(
                Where.eq("knowledge_base_id", base_id), order_by=["created_at"]
            )
            accepted = [
                await self._reset(uow, d, owner, chunking, step=False) for d in documents.items
            ]
            self._changed_after_commit(uow, base_id)
            await uow.commit()
        return accepted

    async def _reset(
        self,
        uow: UnitOfWork,
        document: KnowledgeDocument,
        owner: Owner,
        chunking: ChunkingSpec | None,
        *,
        step: bool = True,
    ) -> Accepted:
        """Inside `uow`: the document back to pending, its chunks gone, a new job for it (the
        old job, should it still run, no longer holds the document and stops)."""
        operation = await self._operations.jobs.submit_in(
            uow,
            kind=OperationKind.KNOWLEDGE_INGESTION,
            input={"knowledge_base_id": document.knowledge_base_id, "document_id": document.id},
            owner=owner,
        )
        was_ready = document.status is DocumentStatus.READY
        await uow.repo(KnowledgeChunk).delete_where(Where.eq("document_id", document.id))
        document.status = DocumentStatus.PENDING
        document.error = None
        document.chunk_count = 0
        document.operation_id = operation.id
        if chunking is not None:
            document.chunking = chunking.model_dump(mode="json")
        document = await uow.repo(KnowledgeDocument).update(document)
        if was_ready and step:
            await self._step_index(uow, document.knowledge_base_id)
            self._changed_after_commit(uow, document.knowledge_base_id)
        return Accepted(document, operation)

    # ---- ingestion (the job) -----------------------------------------------------------------

    async def ingest(self, job: Ingestion) -> dict[str, Any]:
        """Run one document's ingestion job: parse, chunk, embed the chunks not yet stored,
        then make the document ready; a failure that ends the job fails the document."""
        operation = job.operation
        document_id = str(operation.input.get("document_id"))
        try:
            return await self._ingest(job, document_id)
        except _Superseded:
            return {"document_id": document_id, "skipped": "superseded"}
        except Cancelled:
            async with self._storage.unit_of_work() as uow:
                current = await uow.repo(Operation).get(operation.id)
            if current is not None and current.status is OperationStatus.CANCELLED:
                await self._fail_document(document_id, operation.id, "the ingestion was cancelled")
            raise  # a lost lease leaves the document to the worker that holds it now
        except Exception as exc:
            if not is_transient(exc) or job.attempt >= operation.max_attempts:
                await self._fail_document(document_id, operation.id, describe(exc)[1])
            raise

    async def _ingest(self, job: Ingestion, document_id: str) -> dict[str, Any]:
        operation = job.operation
        async with self._storage.unit_of_work() as uow:
            document = await uow.repo(KnowledgeDocument).get(document_id)
            if document is None or document.operation_id != operation.id:
                raise _Superseded
            if document.status is DocumentStatus.READY:
                return {"document_id": document_id, "chunks": document.chunk_count}
            base = await get_existing(
                uow.repo(KnowledgeBase), document.knowledge_base_id, "knowledge base"
            )
            source = await get_existing(uow.repo(KnowledgeSource), document_id, "document source")
            if document.status is not DocumentStatus.PROCESSING:
                document.status = DocumentStatus.PROCESSING
                document = await uow.repo(KnowledgeDocument).update(document)
            stored = await uow.repo(KnowledgeChunk).find(Where.eq("document_id", document_id))
            await uow.commit()
        if base.embedding_model_id is None:
            raise InvalidInput(f"knowledge base '{base.id}' has no embedding model")
        spec = ChunkingSpec.model_validate(document.chunking) if document.chunking else None
        chunking = spec.chunking() if spec else _config(base).chunking.chunking()
        pieces = await asyncio.to_thread(
            self._pieces, ParserKind(document.parser), source.content, chunking
        )
        done = {c.chunk_index for c in stored.items}
        todo = [p for p in pieces if p.index not in done]
        total = len(pieces)
        embedded = total - len(todo)
        await job.set_progress(chunks_embedded=embedded, chunks_total=total)
        caller = await self._calls.job_caller(operation)
        context = CallContext(source=CallSource.KNOWLEDGE_INGESTION, operation_id=operation.id)
        request_dimensions = _config(base).request_dimensions
        batch = self.limits.embed_batch
        for start in range(0, len(todo), batch):
            part = todo[start : start + batch]
            await job.checkpoint()  # before the upstream call: a cancelled job makes none
            embedding = await self._calls.embed(
                ForBase(caller, base.embedding_model_id),
                EmbeddingRequest(
                    model=base.embedding_model_id,
                    input=[p.text for p in part],
                    dimensions=base.embedding_dimensions if request_dimensions else None,
                ),
                context,
            )
            vectors = _vectors(embedding.body, len(part))
            base = await self._store(base, document, operation.id, part, vectors)
            embedded += len(part)
            await job.set_progress(chunks_embedded=embedded, chunks_total=total)
        await job.checkpoint()
        await self._ready(document, operation.id, total)
        return {"document_id": document_id, "chunks": total, "embedded": len(todo)}

    async def _store(
        self,
        base: KnowledgeBase,
        document: KnowledgeDocument,
        operation_id: str,
        pieces: Sequence[Piece],
        vectors: Sequence[Sequence[float]],
    ) -> KnowledgeBase:
        """Store one batch of chunks with their embeddings, if the document is still this job's;
        the base learns its dimensions from its first embeddings."""
        dimensions = {len(v) for v in vectors}
        if len(dimensions) != 1:
            raise InvalidInput("the embedding model answered vectors of different sizes")
        (size,) = dimensions
        async with self._storage.unit_of_work() as uow:
            if base.embedding_dimensions is None:
                learned = await uow.repo(KnowledgeBase).update_where(
                    base.id, {"embedding_dimensions": size}, Where.is_null("embedding_dimensions")
                )
                base = learned or await get_existing(
                    uow.repo(KnowledgeBase), base.id, "knowledge base"
                )
            if base.embedding_dimensions != size:
                raise InvalidInput(
                    f"the embedding model answered {size}-dimensional vectors; knowledge base "
                    f"'{base.id}' holds {base.embedding_dimensions}-dimensional ones"
                )
            if not await uow.repo(KnowledgeDocument).write_where(
                document.id, {"error": None}, *_held(operation_id)
            ):
                raise _Superseded
            await uow.repo(KnowledgeChunk).add_many(
                [
                    _chunk(document, piece, vector)
                    for piece, vector in zip(pieces, vectors, strict=True)
                ]
            )
            await uow.commit()
        return base

    async def _ready(self, document: KnowledgeDocument, operation_id: str, total: int) -> None:
        async with self._storage.unit_of_work() as uow:
            stored = await uow.repo(KnowledgeChunk).count(Where.eq("document_id", document.id))
            if stored != total:
                raise InvalidInput(
                    f"document '{document.id}' has {stored} chunks stored of {total}"
                )
            if not await uow.repo(KnowledgeDocument).write_where(
                document.id,
                {"status": DocumentStatus.READY, "chunk_count": total, "error": None},
                *_held(operation_id),
            ):
                raise _Superseded
            await self._step_index(uow, document.knowledge_base_id)
            self._changed_after_commit(uow, document.knowledge_base_id)
            await uow.commit()

    async def _fail_document(self, document_id: str, operation_id: str, why: str) -> None:
        """The document failed, saying why, with none of its chunks kept (if still this job's)."""
        try:
            async with self._storage.unit_of_work() as uow:
                failed = await uow.repo(KnowledgeDocument).write_where(
                    document_id,
                    {"status": DocumentStatus.FAILED, "error": why, "chunk_count": 0},
                    Where.eq("operation_id", operation_id),
                    Where.in_("status", [DocumentStatus.PENDING, DocumentStatus.PROCESSING]),
                )
                if failed:
                    await uow.repo(KnowledgeChunk).delete_where(
                        Where.eq("document_id", document_id)
                    )
                    await uow.commit()
        except DomainError as exc:
            log.warning("document %s: its failure was not recorded: %s", document_id, exc.message)

    # ---- search ------------------------------------------------------------------------------

    async def search(
        self,
        caller: Caller,
        base_id: str,
        request: SearchRequest,
        *,
        context: CallContext = DIRECT,
    ) -> SearchResults:
        """The chunks of the base's ready documents that best match the query, for `caller` (a
        key needs the base's permission; a keyless job owner has no key permissions to check);
        the query's embedding is a call in `context`."""
        return (await self.search_using(caller, base_id, request, context=context)).results

    async def search_using(
        self,
        caller: Caller,
        base_id: str,
        request: SearchRequest,
        *,
        context: CallContext = DIRECT,
    ) -> Searched:
        """`search`, with what its query's embedding used."""
        # Refused before the base is looked up: a key without it learns nothing of it.
        if isinstance(caller, Principal):
            caller.ensure_can_use(Resource.KNOWLEDGE_BASES, base_id, param="knowledge_base_id")
        where = parse_filter(request.filter)
        base = await self.get_base(base_id)
        if not base.enabled:
            raise NotFound("knowledge base", base_id)
        config = _config(base)
        top_k = request.top_k or config.default_top_k
        min_score = request.min_score if request.min_score is not None else config.default_min_score
        vector_hits: list[Hit] = []
        keyword_hits: list[Hit] = []
        model: str | None = None
        embedded: Embedded | None = None
        depth = top_k if request.mode is not SearchMode.HYBRID else max(top_k, FUSION_DEPTH)
        if request.mode is not SearchMode.KEYWORD:
            embedded = await self._embed_query(caller, base, request.query, context)
            vector, model = _vectors(embedded.body, 1)[0], embedded.model_id
            floor = min_score if request.mode is SearchMode.VECTOR else None
            vector_hits = await self.index.search(
                base, vector, top_k=depth, min_score=floor, where=where
            )
        if request.mode is not SearchMode.VECTOR:
            keyword_hits = await self.index.keyword_search(
                base, request.query, top_k=depth, where=where
            )
        if request.mode is SearchMode.VECTOR:
            ranked = [(h.chunk_id, h.score) for h in vector_hits]
        elif request.mode is SearchMode.KEYWORD:
            ranked = [(h.chunk_id, h.score) for h in keyword_hits]
        else:
            ranked = _fused(vector_hits, keyword_hits)[:top_k]
        results = SearchResults(
            knowledge_base_id=base_id,
            mode=request.mode,
            model=model,
            data=await self._hits(ranked, vector_hits, keyword_hits),
        )
        if embedded is None:
            return Searched(results)
        return Searched(results, Spent.of(embedded.body, embedded.headers))

    async def grade(
        self,
        caller: Caller,
        *,
        query: str,
        chunks: Sequence[Gradable],
        judge_model: str,
        context: CallContext = DIRECT,
        thresholds: Thresholds | None = None,
        include_ambiguous: bool = True,
    ) -> Grading:
        """CRAG's retrieval evaluator: `judge_model` scores each chunk's relevance to `query`
        (calls made for `caller`, in `context`), and the thresholds classify the retrieval."""
        return await grade(
            self._calls,
            caller,
            query=query,
            chunks=chunks,
            judge_model=judge_model,
            context=context,
            thresholds=thresholds,
            include_ambiguous=include_ambiguous,
        )

    async def _embed_query(
        self, caller: Caller, base: KnowledgeBase, query: str, context: CallContext
    ) -> Embedded:
        if base.embedding_model_id is None:
            raise InvalidInput(f"knowledge base '{base.id}' has no embedding model")
        config = _config(base)
        embedded = await self._calls.embed(
            ForBase(caller, base.embedding_model_id),
            EmbeddingRequest(
                model=base.embedding_model_id,
                input=query,
                dimensions=base.embedding_dimensions if config.request_dimensions else None,
            ),
            context,
        )
        return embedded

    async def _hits(
        self, ranked: list[tuple[str, float]], vector: list[Hit], keyword: list[Hit]
    ) -> list[SearchHit]:
        if not ranked:
            return []
        vector_scores = {h.chunk_id: h.score for h in vector}
        keyword_scores = {h.chunk_id: h.score for h in keyword}
        async with self._storage.unit_of_work() as uow:
            chunks = {
                c.id: c for c in await uow.repo(KnowledgeChunk).get_many([i for i, _ in ranked])
            }
            documents = {
                d.id: d
                for d in await uow.repo(KnowledgeDocument).get_many(
                    list({c.document_id for c in chunks.values()})
                )
            }
        hits = []
        for chunk_id, score in ranked:
            found = chunks.get(chunk_id)
            if found is None or found.document_id not in documents:
                continue  # deleted since the snapshot was read
            document = documents[found.document_id]
            meta = found.meta
            hits.append(
                SearchHit(
                    chunk_id=chunk_id,
                    document_id=found.document_id,
                    chunk_index=found.chunk_index,
                    content=found.content,
                    score=score,
                    vector_score=vector_scores.get(chunk_id),
                    keyword_score=keyword_scores.get(chunk_id),
                    title=document.title,
                    filename=document.source_filename,
                    headings=list(meta.get("headings") or []),
                    page=meta.get("page"),
                    row=meta.get("row"),
                    metadata=meta.get("metadata") or {},
                )
            )
        return hits


def _fused(vector: list[Hit], keyword: list[Hit]) -> list[tuple[str, float]]:
    """Reciprocal rank fusion: each ranking gives 1/(RRF_K + rank); ties by chunk id."""
    fused: dict[str, float] = {}
    for ranking in (vector, keyword):
        for rank, hit in enumerate(ranking, start=1):
            fused[hit.chunk_id] = fused.get(hit.chunk_id, 0.0) + 1.0 / (RRF_K + rank)
    return sorted(fused.items(), key=lambda item: (-item[1], item[0]))


def _vectors(body: dict[str, Any], expected: int) -> list[list[float]]:
    """The vectors of an embeddings answer, in input order."""
    data = sorted(body.get("data") or [], key=lambda item: item.get("index", 0))
    vectors = [item.get("embedding") for item in data]
    if len(vectors) != expected or not all(isinstance(v, list) and v for v in vectors):
        raise InvalidInput(
            f"the embedding model answered {len(vectors)} vectors for {expected} inputs"
        )
    return [[float(x) for x in v] for v in vectors if isinstance(v, list)]


def _chunk(document: KnowledgeDocument, piece: Piece, vector: Sequence[float]) -> KnowledgeChunk:
    meta: dict[str, Any] = {
        "start": piece.start,
        "end": piece.end,
        "headings": list(piece.headings),
        "metadata": document.meta,
    }
    if piece.page is not None:
        meta["page"] = piece.page
    if piece.row is not None:
        meta["row"] = piece.row
    return KnowledgeChunk(
        # Named by its place: a batch stored twice (by two workers, say) is refused whole.
        id=f"{document.id}-{piece.index:06d}",
        document_id=document.id,
        knowledge_base_id=document.knowledge_base_id,
        chunk_index=piece.index,
        content=piece.text,
        embedding=pack(vector),
        token_count=max(1, len(piece.text) // 4),
        meta=meta,
    )

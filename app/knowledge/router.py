"""`/admin/knowledge-bases` (bases, documents, chunks, re-indexing) and the search of
`/v1/knowledge-bases/{id}/search`."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Body, Depends, File, Form, Query, UploadFile
from fastapi.responses import Response
from pydantic import ValidationError

from app.access.deps import AdminDep, PrincipalDep
from app.config import Settings
from app.core.errors import InvalidInput
from app.core.provide import provide
from app.core.schemas import Deleted
from app.knowledge.entities import DocumentStatus
from app.knowledge.schemas import (
    ChunkingSpec,
    ChunkList,
    ChunkRead,
    DocumentCreate,
    DocumentList,
    DocumentRead,
    DocumentReindex,
    DocumentsAccepted,
    DocumentToggled,
    KnowledgeBaseCreate,
    KnowledgeBaseList,
    KnowledgeBaseRead,
    KnowledgeBaseUpdate,
    ReindexRequest,
    SearchRequest,
    SearchResults,
    check_metadata,
)
from app.knowledge.service import Accepted, KnowledgeService, Upload, owner_of
from app.operations.transitions import TERMINAL

admin_router = APIRouter(prefix="/admin/knowledge-bases", tags=["admin: knowledge bases"])
router = APIRouter(tags=["knowledge bases"])

KnowledgeDep = Annotated[KnowledgeService, Depends(provide(KnowledgeService))]
SettingsDep = Annotated[Settings, Depends(provide(Settings))]
WaitQuery = Annotated[
    float, Query(ge=0, description="Seconds to wait for the ingestion to finish.")
]
Limit = Annotated[int, Query(ge=1, le=100)]
After = Annotated[str | None, Query(description="The `next_cursor` of the previous page.")]

_ACCEPTED: dict[int | str, dict[str, Any]] = {
    202: {"description": "Accepted: a job ingests it (poll the document or its operation)"},
    201: {"description": "Ingested (ready or failed) within `wait`"},
    400: {"description": "Invalid document (the error names the field)"},
    413: {"description": "The document is larger than KNOWLEDGE_MAX_DOCUMENT_BYTES"},
}


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status, headers, media_type="application/json")


async def _answer(
    knowledge: KnowledgeService,
    accepted: list[Accepted],
    wait: float,
    settings: Settings,
    *,
    many: bool,
) -> Response:
    """202 with each document and its job; 201 once every job finished within `wait`."""
    if wait > 0:
        accepted = await knowledge.wait(accepted, timeout=min(wait, settings.LONG_POLL_MAX_SECONDS))
    finished = all(a.operation.status in TERMINAL for a in accepted)
    shown = [DocumentRead.of(a.document, a.operation.progress) for a in accepted]
    status = 201 if finished else 202
    if many:
        return _json(DocumentsAccepted(data=shown).model_dump(mode="json"), status)
    document = shown[0]
    location = f"/admin/knowledge-bases/{document.knowledge_base_id}/documents/{document.id}"
    return _json(document.model_dump(mode="json"), status, {"Location": location})


# ---- bases -----------------------------------------------------------------------------------


@admin_router.post("", response_model=KnowledgeBaseRead, status_code=201)
async def create_knowledge_base(
    body: KnowledgeBaseCreate, admin: AdminDep, knowledge: KnowledgeDep
) -> KnowledgeBaseRead:
    """Create an empty knowledge base embedding with a gateway model of kind `embedding`."""
    return KnowledgeBaseRead.of(await knowledge.create_base(body))


@admin_router.get("", response_model=KnowledgeBaseList)
async def list_knowledge_bases(
    admin: AdminDep, knowledge: KnowledgeDep, limit: Limit = 20, after: After = None
) -> KnowledgeBaseList:
    """Knowledge bases ordered by id."""
    page = await knowledge.list_bases(limit=limit, after=after)
    return KnowledgeBaseList.of(page, KnowledgeBaseRead.of)


@admin_router.get("/{base_id}", response_model=KnowledgeBaseRead)
async def get_knowledge_base(
    base_id: str, admin: AdminDep, knowledge: KnowledgeDep
) -> KnowledgeBaseRead:
    """One knowledge base."""
    return KnowledgeBaseRead.of(await knowledge.get_base(base_id))


@admin_router.patch("/{base_id}", response_model=KnowledgeBaseRead)
async def update_knowledge_base(
    base_id: str, body: KnowledgeBaseUpdate, admin: AdminDep, knowledge: KnowledgeDep
) -> KnowledgeBaseRead:
    """Change a base's name, description, default chunking, search defaults or enabled flag."""
    return KnowledgeBaseRead.of(await knowledge.update_base(base_id, body))


@admin_router.delete("/{base_id}", response_model=Deleted)
async def delete_knowledge_base(base_id: str, admin: AdminDep, knowledge: KnowledgeDep) -> Deleted:
    """Delete a base with every document and chunk of it."""
    await knowledge.delete_base(base_id)
    return Deleted(id=base_id, object="knowledge_base")


@admin_router.post("/{base_id}/reindex", status_code=202, response_model=DocumentsAccepted)
async def reindex_knowledge_base(
    base_id: str,
    admin: AdminDep,
    knowledge: KnowledgeDep,
    body: Annotated[ReindexRequest | None, Body()] = None,
) -> DocumentsAccepted:
    """Ingest every document again (after switching to `embedding_model`, when given)."""
    request = body or ReindexRequest()
    accepted = await knowledge.reindex_base(
        base_id,
        owner=owner_of(admin),
        embedding_model=request.embedding_model,
        embedding_dimensions=request.embedding_dimensions,
        chunking=request.chunking,
    )
    return DocumentsAccepted(data=[DocumentRead.of(a.document) for a in accepted])


# ---- documents -------------------------------------------------------------------------------


@admin_router.post("/{base_id}/documents", status_code=202, responses=_ACCEPTED)
async def create_document(
    base_id: str,
    body: DocumentCreate,
    admin: AdminDep,
    knowledge: KnowledgeDep,
    settings: SettingsDep,
    wait: WaitQuery = 0,
) -> Response:
    """Ingest a document given as text; a job parses, chunks and embeds it."""
    upload = Upload(
        content=body.content.encode(),
        title=body.title,
        description=body.description,
        filename=body.filename,
        content_type=body.content_type,
        parser=body.parser,
        metadata=body.metadata,
        chunking=body.chunking,
    )
    accepted = await knowledge.add_documents(
        base_id, [upload], owner=owner_of(admin), param="content"
    )
    return await _answer(knowledge, accepted, wait, settings, many=False)


def _form_json(value: str | None, param: str) -> Any:
    if value is None or not value.strip():
        return None
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"{param} is not valid JSON: {exc}", param=param) from None


@admin_router.post("/{base_id}/documents/upload", status_code=202, responses=_ACCEPTED)
async def upload_documents(
    base_id: str,
    admin: AdminDep,
    knowledge: KnowledgeDep,
    settings: SettingsDep,
    files: Annotated[list[UploadFile], File(description="One or more files to ingest.")],
    metadata: Annotated[str | None, Form(description="A JSON object, given to each file.")] = None,
    parser: Annotated[str | None, Form(max_length=32)] = None,
    chunking: Annotated[str | None, Form(description="A JSON chunking object.")] = None,
    wait: WaitQuery = 0,
) -> Response:
    """Ingest uploaded files (text, Markdown, HTML, JSON, CSV, PDF), a job each."""
    meta = _form_json(metadata, "metadata") or {}
    if not isinstance(meta, dict):
        raise InvalidInput("metadata must be a JSON object", param="metadata")
    try:
        check_metadata(meta)
        spec = ChunkingSpec.model_validate(_form_json(chunking, "chunking") or {})
    except ValueError as exc:
        where = "chunking" if isinstance(exc, ValidationError) else "metadata"
        raise InvalidInput(f"{where}: {exc}", param=where) from None
    limit = knowledge.limits.max_document_bytes
    uploads = [
        Upload(
            # One byte past the limit is enough to refuse the file without reading all of it.
            content=await file.read(limit + 1),
            title=file.filename,
            filename=file.filename,
            content_type=file.content_type,
            parser=parser,
            metadata=meta,
            chunking=spec if chunking else None,
        )
        for file in files
    ]
    accepted = await knowledge.add_documents(base_id, uploads, owner=owner_of(admin))
    return await _answer(knowledge, accepted, wait, settings, many=True)


@admin_router.get("/{base_id}/documents", response_model=DocumentList)
async def list_documents(
    base_id: str,
    admin: AdminDep,
    knowledge: KnowledgeDep,
    status: DocumentStatus | None = None,
    limit: Limit = 20,
    after: After = None,
) -> DocumentList:
    """A base's documents, newest first."""
    page = await knowledge.list_documents(base_id, status=status, limit=limit, after=after)
    return DocumentList.of(page, DocumentRead.of)


@admin_router.get("/{base_id}/documents/{document_id}", response_model=DocumentRead)
async def get_document(
    base_id: str, document_id: str, admin: AdminDep, knowledge: KnowledgeDep
) -> DocumentRead:
    """A document, with its ingestion's progress while it runs."""
    document, operation = await knowledge.document_with_job(base_id, document_id)
    return DocumentRead.of(document, operation.progress if operation is not None else None)


@admin_router.get("/{base_id}/documents/{document_id}/chunks", response_model=ChunkList)
async def list_chunks(
    base_id: str,
    document_id: str,
    admin: AdminDep,
    knowledge: KnowledgeDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: After = None,
) -> ChunkList:
    """A document's chunks in order."""
    page = await knowledge.list_chunks(base_id, document_id, limit=limit, after=after)
    return ChunkList.of(page, ChunkRead.of)


async def _toggle(
    knowledge: KnowledgeService, base_id: str, document_id: str, disabled: bool
) -> DocumentToggled:
    document = await knowledge.set_disabled(base_id, document_id, disabled)
    return DocumentToggled(id=document.id, knowledge_base_id=base_id, disabled=document.disabled)


@admin_router.post("/{base_id}/documents/{document_id}/disable", response_model=DocumentToggled)
async def disable_document(
    base_id: str, document_id: str, admin: AdminDep, knowledge: KnowledgeDep
) -> DocumentToggled:
    """Leave a document out of searches; its chunks stay stored."""
    return await _toggle(knowledge, base_id, document_id, True)


@admin_router.post("/{base_id}/documents/{document_id}/enable", response_model=DocumentToggled)
async def enable_document(
    base_id: str, document_id: str, admin: AdminDep, knowledge: KnowledgeDep
) -> DocumentToggled:
    """Search a disabled document again."""
    return await _toggle(knowledge, base_id, document_id, False)


@admin_router.delete("/{base_id}/documents/{document_id}", response_model=Deleted)
async def delete_document(
    base_id: str, document_id: str, admin: AdminDep, knowledge: KnowledgeDep
) -> Deleted:
    """Delete a document with its chunks."""
    await knowledge.delete_document(base_id, document_id)
    return Deleted(id=document_id, object="knowledge_base.document")


@admin_router.post(
    "/{base_id}/documents/{document_id}/reindex",
    status_code=202,
    response_model=DocumentRead,
)
async def reindex_document(
    base_id: str,
    document_id: str,
    admin: AdminDep,
    knowledge: KnowledgeDep,
    body: Annotated[DocumentReindex | None, Body()] = None,
) -> DocumentRead:
    """Ingest a document again from its kept source (with new chunking, when given)."""
    accepted = await knowledge.reindex_document(
        base_id, document_id, owner=owner_of(admin), chunking=(body.chunking if body else None)
    )
    return DocumentRead.of(accepted.document)


# ---- search ----------------------------------------------------------------------------------


@router.post(
    "/v1/knowledge-bases/{base_id}/search",
    response_model=SearchResults,
    responses={
        400: {"description": "Invalid query or filter (the error names the part)"},
        403: {"description": "The key may not use this knowledge base"},
        404: {"description": "Unknown or disabled knowledge base"},
    },
)
async def search_knowledge_base(
    base_id: str, body: SearchRequest, principal: PrincipalDep, knowledge: KnowledgeDep
) -> SearchResults:
    """The chunks that best match the query: by embedding (`vector`), by words (`keyword`), or
    both fused (`hybrid`); filtered on the documents' metadata."""
    return await knowledge.search(principal, base_id, body)

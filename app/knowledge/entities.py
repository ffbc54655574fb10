"""The knowledge tables: knowledge bases, their documents (and the files they came from), and the
embedded chunks searched."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field

from app.storage.entity import (
    Entity,
    big,
    binary,
    choice,
    json_object,
    pk,
    reference,
    text,
)


class KnowledgeBaseType(StrEnum):
    BUILTIN = "builtin"  # chunks and embeddings in the gateway's own tables
    PGVECTOR = "pgvector"  # an external pgvector database reached through a credential


class DocumentStatus(StrEnum):
    """Where a document's ingestion stands; only `ready` documents are searched."""

    PENDING = "pending"  # accepted, its ingestion job not started
    PROCESSING = "processing"  # parsed, chunked, chunks being embedded and stored
    READY = "ready"  # every chunk stored with its embedding
    FAILED = "failed"  # `error` says why; no chunk of it is kept


class KnowledgeBase(Entity, table=True):
    """A searchable collection of documents embedded with one embedding model."""

    __tablename__ = "knowledge_bases"

    id: str = pk()
    name: str = text(max_length=200)
    description: str | None = text(None)
    kb_type: KnowledgeBaseType = choice(KnowledgeBaseType, KnowledgeBaseType.BUILTIN)
    # Stored embeddings only make sense with the model that made them, so it cannot be deleted.
    embedding_model_id: str | None = reference("models.id", on_delete="RESTRICT", nullable=True)
    # None until the first embeddings answered, when not asked of the model explicitly.
    embedding_dimensions: int | None = None
    # Search defaults (top_k, min_score), the default chunking, whether to ask for dimensions.
    config: dict[str, Any] = json_object()
    # Where an external store lives (table, metric); its secret stays in the credential.
    credential_id: str | None = reference("credentials.id", on_delete="RESTRICT", nullable=True)
    connection_config: dict[str, Any] = json_object()
    enabled: bool = True
    # Stepped whenever the searchable chunks change (a document ready, disabled, deleted): a
    # process's cached search matrix of an older step is stale.
    index_version: int = 0


class KnowledgeDocument(Entity, table=True):
    """One ingested document of a knowledge base; its text lives in its chunks."""

    __tablename__ = "knowledge_base_documents"

    id: str = pk()
    knowledge_base_id: str = reference("knowledge_bases.id")
    title: str = text(max_length=500)
    description: str | None = text(None)
    source_filename: str | None = text(None, max_length=255)
    content_type: str | None = text(None, max_length=255)
    original_size_bytes: int = big()
    chunk_count: int = 0
    meta: dict[str, Any] = json_object()
    # A disabled document stays stored but is left out of searches.
    disabled: bool = False
    status: DocumentStatus = choice(DocumentStatus, DocumentStatus.PENDING)
    error: str | None = text(None)
    # The job ingesting it now (or last); only that job may write its chunks. Not a reference:
    # finished jobs are purged after their retention, documents stay.
    operation_id: str | None = text(None, max_length=64)
    # How it is parsed and chunked (the parser's name; the chunking's strategy and sizes).
    parser: str = text("text", max_length=32)
    chunking: dict[str, Any] = json_object()


class KnowledgeSource(Entity, table=True):
    """The file a document was ingested from, kept so that it can be ingested again."""

    __tablename__ = "knowledge_base_sources"

    document_id: str = Field(
        primary_key=True,
        max_length=64,
        sa_type=sa.String(64),
        sa_column_args=[sa.ForeignKey("knowledge_base_documents.id", ondelete="CASCADE")],
    )
    content: bytes = binary()


class KnowledgeChunk(Entity, table=True):
    """A piece of a document's text with its embedding."""

    __tablename__ = "knowledge_base_chunks"
    __table_args__ = (
        sa.UniqueConstraint(
            "document_id", "chunk_index", name="uq_knowledge_base_chunks_document_id_chunk_index"
        ),
    )

    id: str = pk()
    # The unique key leads with document_id, so it serves lookups by document as well.
    document_id: str = reference("knowledge_base_documents.id", index=False)
    # Denormalised (no reference: the document's own cascades) so a search reads one table.
    knowledge_base_id: str = text(max_length=64, index=True)
    chunk_index: int
    content: str = text()
    # Little-endian float32, as the model answered it (not normalised).
    embedding: bytes = binary()
    token_count: int = 0
    # Its position (start, end), heading path, page or row, and the document's metadata.
    meta: dict[str, Any] = json_object()

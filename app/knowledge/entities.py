"""The knowledge tables: knowledge bases, their documents, and the embedded chunks searched."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import sqlalchemy as sa

from app.storage.entity import Entity, big, choice, json_list, json_object, pk, reference, text


class KnowledgeBaseType(StrEnum):
    BUILTIN = "builtin"  # chunks and embeddings in the gateway's own tables
    PGVECTOR = "pgvector"  # an external pgvector database reached through a credential


class KnowledgeBase(Entity, table=True):
    """A searchable collection of documents embedded with one embedding model."""

    __tablename__ = "knowledge_bases"

    id: str = pk()
    name: str = text(max_length=200)
    description: str | None = text(None)
    kb_type: KnowledgeBaseType = choice(KnowledgeBaseType, KnowledgeBaseType.BUILTIN)
    # Stored embeddings only make sense with the model that made them, so it cannot be deleted.
    embedding_model_id: str | None = reference("models.id", on_delete="RESTRICT", nullable=True)
    embedding_dimensions: int = 1536
    # Search defaults: top_k, similarity threshold, what to include in results.
    config: dict[str, Any] = json_object()
    # Where an external store lives (table, metric); its secret stays in the credential.
    credential_id: str | None = reference("credentials.id", on_delete="RESTRICT", nullable=True)
    connection_config: dict[str, Any] = json_object()
    enabled: bool = True


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
    embedding: list[float] = json_list()
    token_count: int = 0
    meta: dict[str, Any] = json_object()

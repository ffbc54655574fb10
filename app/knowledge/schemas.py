"""Knowledge bases, documents, chunks and searches as the API accepts and shows them."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.core.ids import SLUG_MAX, is_slug
from app.core.schemas import ListPage, from_entity
from app.knowledge.chunking import DEFAULT_OVERLAP, DEFAULT_SIZE, MAX_SIZE, Chunking
from app.knowledge.chunking import ChunkStrategy as ChunkStrategy
from app.knowledge.entities import (
    DocumentStatus,
    KnowledgeBase,
    KnowledgeBaseType,
    KnowledgeChunk,
    KnowledgeDocument,
)

MAX_QUERY = 10_000
MAX_TOP_K = 100
MAX_CONTENT_CHARS = 10_000_000


def _slug(value: str) -> str:
    if not is_slug(value):
        raise ValueError(
            f"must be 1 to {SLUG_MAX} letters, digits and inner hyphens (e.g. 'support-docs')"
        )
    return value


def check_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """Document metadata: names starting with `_` are the chunk's own filter fields."""
    for key in metadata:
        if not key or key.startswith("_"):
            raise ValueError(f"metadata names must not be empty or start with '_' ({key!r})")
        if "." in key:
            raise ValueError(f"metadata names must not contain '.', which filters use ({key!r})")
    return metadata


class ChunkingSpec(BaseModel):
    """How documents are cut into chunks (sizes in characters)."""

    model_config = ConfigDict(extra="forbid")

    strategy: ChunkStrategy = ChunkStrategy.FIXED_SIZE
    chunk_size: int = Field(default=DEFAULT_SIZE, ge=50, le=MAX_SIZE)
    chunk_overlap: int = Field(default=DEFAULT_OVERLAP, ge=0, le=MAX_SIZE)

    @model_validator(mode="after")
    def _overlap_below_size(self) -> Self:
        if self.chunk_overlap >= self.chunk_size:
            raise ValueError("chunk_overlap must be smaller than chunk_size")
        return self

    def chunking(self) -> Chunking:
        return Chunking(self.strategy, self.chunk_size, self.chunk_overlap)


class KnowledgeBaseConfig(BaseModel):
    """What a base keeps in its `config`: search defaults and the default chunking."""

    default_top_k: int = 10
    default_min_score: float | None = None
    chunking: ChunkingSpec = Field(default_factory=ChunkingSpec)
    # Whether `dimensions` is asked of the model (set when the base was given dimensions).
    request_dimensions: bool = False


class KnowledgeBaseCreate(BaseModel):
    """A new knowledge base: its id, and the embedding model its chunks and queries use."""

    model_config = ConfigDict(extra="forbid")

    id: str
    name: str = Field(min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=2000)
    kb_type: Literal[KnowledgeBaseType.BUILTIN] = KnowledgeBaseType.BUILTIN
    embedding_model: str = Field(min_length=1, max_length=64)
    # Asked of the model when given (models that take `dimensions`); else the model's own.
    embedding_dimensions: int | None = Field(default=None, ge=1, le=8192)
    chunking: ChunkingSpec = Field(default_factory=ChunkingSpec)
    default_top_k: int = Field(default=10, ge=1, le=MAX_TOP_K)
    default_min_score: float | None = Field(default=None, ge=-1, le=1)
    enabled: bool = True

    _id = field_validator("id")(_slug)


class KnowledgeBaseUpdate(BaseModel):
    """Changes to a base; its embedding model changes only by re-indexing (`/reindex`)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=2000)
    chunking: ChunkingSpec | None = None
    default_top_k: int | None = Field(default=None, ge=1, le=MAX_TOP_K)
    default_min_score: float | None = Field(default=None, ge=-1, le=1)
    enabled: bool | None = None

    @model_validator(mode="after")
    def _not_null(self) -> Self:
        nullable = {"description", "default_min_score"}
        for name in self.model_fields_set - nullable:
            if getattr(self, name) is None:
                raise ValueError(f"{name} cannot be null")
        return self


class ReindexRequest(BaseModel):
    """Ingest every document again, with another embedding model if one is named."""

    model_config = ConfigDict(extra="forbid")

    embedding_model: str | None = Field(default=None, min_length=1, max_length=64)
    embedding_dimensions: int | None = Field(default=None, ge=1, le=8192)
    chunking: ChunkingSpec | None = None


class DocumentReindex(BaseModel):
    model_config = ConfigDict(extra="forbid")

    chunking: ChunkingSpec | None = None


class KnowledgeBaseRead(BaseModel):
    id: str
    object: Literal["knowledge_base"] = "knowledge_base"
    name: str
    description: str | None
    kb_type: KnowledgeBaseType
    embedding_model: str | None
    embedding_dimensions: int | None
    chunking: ChunkingSpec
    default_top_k: int
    default_min_score: float | None
    enabled: bool
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, base: KnowledgeBase) -> KnowledgeBaseRead:
        config = KnowledgeBaseConfig.model_validate(base.config)
        return from_entity(
            cls,
            base,
            embedding_model=base.embedding_model_id,
            chunking=config.chunking,
            default_top_k=config.default_top_k,
            default_min_score=config.default_min_score,
        )


class KnowledgeBaseList(ListPage[KnowledgeBaseRead]):
    pass


class DocumentCreate(BaseModel):
    """A document given as text: ingested by a job (202), parsed as `parser` says or as the
    content type or file name suggest."""

    model_config = ConfigDict(extra="forbid")

    content: str = Field(min_length=1, max_length=MAX_CONTENT_CHARS)
    title: str | None = Field(default=None, min_length=1, max_length=500)
    description: str | None = Field(default=None, max_length=2000)
    filename: str | None = Field(default=None, min_length=1, max_length=255)
    content_type: str | None = Field(default=None, min_length=1, max_length=255)
    parser: str | None = Field(default=None, max_length=32)
    metadata: dict[str, Any] = Field(default_factory=dict)
    chunking: ChunkingSpec | None = None

    _metadata = field_validator("metadata")(check_metadata)


class IngestionProgress(BaseModel):
    chunks_embedded: int = 0
    chunks_total: int | None = None


class DocumentRead(BaseModel):
    id: str
    object: Literal["knowledge_base.document"] = "knowledge_base.document"
    knowledge_base_id: str
    title: str
    description: str | None
    source_filename: str | None
    content_type: str | None
    size_bytes: int
    parser: str
    chunking: dict[str, Any]
    metadata: dict[str, Any]
    status: DocumentStatus
    error: str | None
    operation_id: str | None
    progress: IngestionProgress | None = None
    chunk_count: int
    disabled: bool
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(
        cls, document: KnowledgeDocument, progress: dict[str, Any] | None = None
    ) -> DocumentRead:
        return from_entity(
            cls,
            document,
            size_bytes=document.original_size_bytes,
            metadata=document.meta,
            progress=IngestionProgress.model_validate(progress) if progress else None,
        )


class DocumentList(ListPage[DocumentRead]):
    pass


class DocumentsAccepted(BaseModel):
    """Documents accepted for ingestion: each with the job that ingests it."""

    object: Literal["list"] = "list"
    data: list[DocumentRead]


class ChunkRead(BaseModel):
    id: str
    object: Literal["knowledge_base.chunk"] = "knowledge_base.chunk"
    document_id: str
    chunk_index: int
    content: str
    token_count: int
    start: int | None
    end: int | None
    headings: list[str]
    page: int | None
    row: int | None
    metadata: dict[str, Any]
    created_at: datetime

    @classmethod
    def of(cls, chunk: KnowledgeChunk) -> ChunkRead:
        meta = chunk.meta
        return from_entity(
            cls,
            chunk,
            start=meta.get("start"),
            end=meta.get("end"),
            headings=list(meta.get("headings") or []),
            page=meta.get("page"),
            row=meta.get("row"),
            metadata=meta.get("metadata") or {},
        )


class ChunkList(ListPage[ChunkRead]):
    pass


class DocumentToggled(BaseModel):
    id: str
    object: Literal["knowledge_base.document"] = "knowledge_base.document"
    knowledge_base_id: str
    disabled: bool


class SearchMode(StrEnum):
    VECTOR = "vector"  # cosine similarity of embeddings
    KEYWORD = "keyword"  # BM25 over the chunks' words
    HYBRID = "hybrid"  # both, fused by reciprocal rank


class SearchRequest(BaseModel):
    """`POST /v1/knowledge-bases/{id}/search`."""

    model_config = ConfigDict(extra="forbid")

    query: str = Field(min_length=1, max_length=MAX_QUERY)
    top_k: int | None = Field(default=None, ge=1, le=MAX_TOP_K)
    # A cosine similarity (-1 to 1); applies to vector searches.
    min_score: float | None = Field(default=None, ge=-1, le=1)
    filter: dict[str, Any] | None = None
    mode: SearchMode = SearchMode.VECTOR


class SearchHit(BaseModel):
    chunk_id: str
    document_id: str
    chunk_index: int
    content: str
    score: float
    vector_score: float | None = None
    keyword_score: float | None = None
    title: str | None = None
    filename: str | None = None
    headings: list[str]
    page: int | None
    row: int | None
    metadata: dict[str, Any]


class SearchResults(BaseModel):
    object: Literal["list"] = "list"
    knowledge_base_id: str
    mode: SearchMode
    model: str | None
    data: list[SearchHit]


class GradeVerdict(StrEnum):
    CORRECT = "correct"
    AMBIGUOUS = "ambiguous"
    INCORRECT = "incorrect"


Score = Annotated[float, Field(ge=0, le=1)]

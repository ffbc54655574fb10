"""Knowledge bases ingest as jobs: document status, kept sources, packed embeddings.

Revision ID: 3f1b7c9d2e40
Revises: 3b64a81239ac
Create Date: 2026-12-07 01:40:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "3f1b7c9d2e40"
down_revision: str | Sequence[str] | None = "3b64a81239ac"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.alter_column("knowledge_bases", "embedding_dimensions", nullable=True)
    op.add_column(
        "knowledge_bases",
        sa.Column("index_version", sa.Integer(), nullable=False, server_default="0"),
    )
    op.alter_column("knowledge_bases", "index_version", server_default=None)

    for name, column in (
        (
            "status",
            sa.Column("status", sa.String(length=32), nullable=False, server_default="ready"),
        ),
        ("error", sa.Column("error", sa.Text(), nullable=True)),
        ("operation_id", sa.Column("operation_id", sa.String(length=64), nullable=True)),
        (
            "parser",
            sa.Column("parser", sa.String(length=32), nullable=False, server_default="text"),
        ),
        (
            "chunking",
            sa.Column(
                "chunking",
                postgresql.JSONB(astext_type=sa.Text()),
                nullable=False,
                server_default=sa.text("'{}'::jsonb"),
            ),
        ),
    ):
        op.add_column("knowledge_base_documents", column)
        if column.server_default is not None:
            # The defaults only fill existing rows; the application always writes the columns.
            op.alter_column("knowledge_base_documents", name, server_default=None)

    op.create_table(
        "knowledge_base_sources",
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("document_id", sa.String(length=64), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["document_id"],
            ["knowledge_base_documents.id"],
            name=op.f("fk_knowledge_base_sources_document_id_knowledge_base_documents"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("document_id", name=op.f("pk_knowledge_base_sources")),
    )

    # JSON lists of floats become packed float32: a quarter of the size, read without parsing.
    # No chunk could be stored before this revision (nothing wrote them), so none is converted.
    op.drop_column("knowledge_base_chunks", "embedding")
    op.add_column(
        "knowledge_base_chunks",
        sa.Column(
            "embedding", sa.LargeBinary(), nullable=False, server_default=sa.text("''::bytea")
        ),
    )
    op.alter_column("knowledge_base_chunks", "embedding", server_default=None)


def downgrade() -> None:
    op.drop_column("knowledge_base_chunks", "embedding")
    op.add_column(
        "knowledge_base_chunks",
        sa.Column(
            "embedding",
            postgresql.JSONB(astext_type=sa.Text()),
            nullable=False,
            server_default=sa.text("'[]'::jsonb"),
        ),
    )
    op.alter_column("knowledge_base_chunks", "embedding", server_default=None)
    op.drop_table("knowledge_base_sources")
    for name in ("chunking", "parser", "operation_id", "error", "status"):
        op.drop_column("knowledge_base_documents", name)
    op.drop_column("knowledge_bases", "index_version")
    op.execute(
        "UPDATE knowledge_bases SET embedding_dimensions = 1536 WHERE embedding_dimensions IS NULL"
    )
    op.alter_column("knowledge_bases", "embedding_dimensions", nullable=False)

"""Jobs keep the trace context of the span that created them.

Revision ID: 3f1c9a7e2b4d
Revises: 5e7545995fae
Create Date: 2026-12-07 01:40:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "3f1c9a7e2b4d"
down_revision: str | Sequence[str] | None = "5e7545995fae"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "operations",
        sa.Column(
            "trace_context",
            postgresql.JSONB(astext_type=sa.Text()),
            nullable=False,
            server_default=sa.text("'{}'::jsonb"),
        ),
    )
    # The default only fills existing rows; the application always writes the column.
    op.alter_column("operations", "trace_context", server_default=None)


def downgrade() -> None:
    op.drop_column("operations", "trace_context")

"""Usage records keep the gateway's overhead; execution logs its provider, cache hit and overhead.

Revision ID: 8d2e6b4f1a9c
Revises: 3f1c9a7e2b4d
Create Date: 2026-12-07 02:30:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "8d2e6b4f1a9c"
down_revision: str | Sequence[str] | None = "3f1c9a7e2b4d"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("usage_records", sa.Column("overhead_ms", sa.Float(), nullable=True))
    op.add_column("execution_logs", sa.Column("provider", sa.String(32), nullable=True))
    op.add_column(
        "execution_logs",
        sa.Column("cache_hit", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    # The default only fills existing rows; the application always writes the column.
    op.alter_column("execution_logs", "cache_hit", server_default=None)
    op.add_column("execution_logs", sa.Column("overhead_ms", sa.Float(), nullable=True))


def downgrade() -> None:
    op.drop_column("execution_logs", "overhead_ms")
    op.drop_column("execution_logs", "cache_hit")
    op.drop_column("execution_logs", "provider")
    op.drop_column("usage_records", "overhead_ms")

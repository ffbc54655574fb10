"""Teams get rate limits shared by their keys.

Revision ID: 5e7545995fae
Revises: 6752b85e5d5a
Create Date: 2026-11-27 22:20:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "5e7545995fae"
down_revision: str | Sequence[str] | None = "6752b85e5d5a"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "teams",
        sa.Column(
            "rate_limits",
            postgresql.JSONB(astext_type=sa.Text()),
            nullable=False,
            server_default=sa.text("'{}'::jsonb"),
        ),
    )
    # The default only fills existing rows; the application always writes the column.
    op.alter_column("teams", "rate_limits", server_default=None)


def downgrade() -> None:
    op.drop_column("teams", "rate_limits")

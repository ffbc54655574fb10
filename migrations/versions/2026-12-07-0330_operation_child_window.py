"""A parent job sends its children a window at a time and may run its own handler after them.

Revision ID: 8c2d4e6f1a3b
Revises: 5c2e8a41d7f3
Create Date: 2026-12-07 03:30:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "8c2d4e6f1a3b"
down_revision: str | Sequence[str] | None = "5c2e8a41d7f3"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "operations",
        sa.Column("children_sent", sa.Integer(), nullable=False, server_default="0"),
    )
    op.add_column(
        "operations",
        sa.Column("runs_after_children", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    # Every child of an existing parent was sent when it was submitted.
    op.execute("UPDATE operations SET children_sent = children_total WHERE children_total > 0")
    # The defaults only fill existing rows; the application always writes the columns.
    op.alter_column("operations", "children_sent", server_default=None)
    op.alter_column("operations", "runs_after_children", server_default=None)


def downgrade() -> None:
    op.drop_column("operations", "runs_after_children")
    op.drop_column("operations", "children_sent")

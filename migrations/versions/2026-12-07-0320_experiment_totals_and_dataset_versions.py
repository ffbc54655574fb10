"""Experiment totals (rolled up from records: totals, units, feedback changes), the paired
differences of offline records, and dataset versions (items valid over a range of versions).

Records already stored are stamped with this migration's transaction id, below any later
horizon: the first roll-up counts them. Items already stored become version 1 of their rows,
and each dataset gets one version row, its current revision: earlier versions were not kept.

Revision ID: 5c2e8a41d7f3
Revises: 3f1b7c9d2e40
Create Date: 2026-12-07 02:00:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "5c2e8a41d7f3"
down_revision: str | Sequence[str] | None = "3f1b7c9d2e40"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CURRENT = 2**31 - 1
# The inserting transaction's id: a commit-order stamp (`app.storage.entity.commit_stamp`).
_XACT_ID = sa.text("pg_current_xact_id()::text::bigint")
_DIFFS = (
    ("success_diff", sa.Integer()),
    ("latency_ms_diff", sa.Integer()),
    ("first_token_ms_diff", sa.Integer()),
    ("input_tokens_diff", sa.Integer()),
    ("output_tokens_diff", sa.Integer()),
    ("cost_micros_diff", sa.BigInteger()),
)


def _stamps() -> list[sa.Column[object]]:
    return [
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
    ]


def _experiment_reference(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["experiment_id"],
        ["experiments.id"],
        name=op.f(f"fk_{table}_experiment_id_experiments"),
        ondelete="CASCADE",
    )


def upgrade() -> None:
    op.add_column(
        "experiment_records",
        sa.Column("commit_stamp", sa.BigInteger(), server_default=_XACT_ID, nullable=True),
    )
    for name, kind in _DIFFS:
        op.add_column("experiment_records", sa.Column(name, kind, nullable=True))
    op.create_index(
        "ix_experiment_records_experiment_id_commit_stamp",
        "experiment_records",
        ["experiment_id", "commit_stamp"],
        unique=False,
    )
    op.create_index(
        "ix_experiment_records_experiment_id_variant_id_score_id",
        "experiment_records",
        ["experiment_id", "variant_id", "feedback_score", "id"],
        unique=False,
        postgresql_where=sa.text("feedback_score IS NOT NULL"),
    )
    op.create_table(
        "experiment_feedback_changes",
        *_stamps(),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("experiment_id", sa.String(length=64), nullable=False),
        sa.Column("record_id", sa.String(length=64), nullable=False),
        sa.Column("variant_id", sa.String(length=64), nullable=False),
        sa.Column("source", sa.String(length=32), nullable=False),
        sa.Column("operation_id", sa.String(length=64), nullable=True),
        sa.Column("scored", sa.Integer(), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("score_squares", sa.Float(), nullable=False),
        sa.Column("label_added", sa.String(length=100), nullable=True),
        sa.Column("label_removed", sa.String(length=100), nullable=True),
        sa.Column("commit_stamp", sa.BigInteger(), server_default=_XACT_ID, nullable=True),
        _experiment_reference("experiment_feedback_changes"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_experiment_feedback_changes")),
    )
    op.create_index(
        op.f("ix_experiment_feedback_changes_experiment_id"),
        "experiment_feedback_changes",
        ["experiment_id"],
        unique=False,
    )
    op.create_index(
        "ix_experiment_feedback_changes_experiment_id_commit_stamp",
        "experiment_feedback_changes",
        ["experiment_id", "commit_stamp"],
        unique=False,
    )
    op.create_table(
        "experiment_watermarks",
        *_stamps(),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("watermark", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["id"],
            ["experiments.id"],
            name=op.f("fk_experiment_watermarks_id_experiments"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_experiment_watermarks")),
    )
    op.create_table(
        "experiment_totals",
        *_stamps(),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("experiment_id", sa.String(length=64), nullable=False),
        sa.Column("variant_id", sa.String(length=64), nullable=False),
        sa.Column("source", sa.String(length=32), nullable=False),
        sa.Column("operation_id", sa.String(length=64), nullable=True),
        sa.Column("calls", sa.BigInteger(), nullable=False),
        sa.Column("units", sa.BigInteger(), nullable=False),
        sa.Column("moments", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("sketches", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("labels", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        _experiment_reference("experiment_totals"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_experiment_totals")),
    )
    op.create_index(
        "ix_experiment_totals_experiment_id_source_operation_id",
        "experiment_totals",
        ["experiment_id", "source", "operation_id"],
        unique=False,
    )
    op.create_table(
        "experiment_units",
        *_stamps(),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("experiment_id", sa.String(length=64), nullable=False),
        sa.Column("totals_id", sa.String(length=64), nullable=False),
        _experiment_reference("experiment_units"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_experiment_units")),
    )
    op.create_index(
        op.f("ix_experiment_units_experiment_id"),
        "experiment_units",
        ["experiment_id"],
        unique=False,
    )

    op.alter_column("datasets", "revision", new_column_name="current_version")
    op.create_table(
        "dataset_versions",
        *_stamps(),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("dataset_id", sa.String(length=64), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("change", sa.String(length=32), nullable=False),
        sa.Column("items_changed", sa.Integer(), nullable=False),
        sa.Column("item_count", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["dataset_id"],
            ["datasets.id"],
            name=op.f("fk_dataset_versions_dataset_id_datasets"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dataset_versions")),
    )
    op.create_index(
        op.f("ix_dataset_versions_dataset_id"), "dataset_versions", ["dataset_id"], unique=False
    )
    op.execute(
        "INSERT INTO dataset_versions (created_at, updated_at, version, id, dataset_id, number,"
        " change, items_changed, item_count) SELECT updated_at, updated_at, 1,"
        " id || '@' || current_version, id, current_version, 'created', item_count, item_count"
        " FROM datasets"
    )
    op.add_column("dataset_items", sa.Column("item_id", sa.String(length=48), nullable=True))
    op.add_column(
        "dataset_items",
        sa.Column("valid_from", sa.Integer(), nullable=False, server_default="1"),
    )
    op.add_column(
        "dataset_items",
        sa.Column("valid_to", sa.Integer(), nullable=False, server_default=str(CURRENT)),
    )
    op.execute("UPDATE dataset_items SET item_id = id, id = id || '.1'")
    op.alter_column("dataset_items", "item_id", nullable=False)
    op.alter_column("dataset_items", "valid_from", server_default=None)
    op.alter_column("dataset_items", "valid_to", server_default=None)
    op.drop_constraint("uq_dataset_items_dataset_id_position", "dataset_items", type_="unique")
    op.create_unique_constraint(
        "uq_dataset_items_dataset_id_valid_to_position",
        "dataset_items",
        ["dataset_id", "valid_to", "position"],
    )


def downgrade() -> None:
    # Only the current version of each dataset is kept.
    op.execute(f"DELETE FROM dataset_items WHERE valid_to <> {CURRENT}")
    op.drop_constraint(
        "uq_dataset_items_dataset_id_valid_to_position", "dataset_items", type_="unique"
    )
    op.execute("UPDATE dataset_items SET id = item_id")
    op.drop_column("dataset_items", "valid_to")
    op.drop_column("dataset_items", "valid_from")
    op.drop_column("dataset_items", "item_id")
    op.create_unique_constraint(
        "uq_dataset_items_dataset_id_position", "dataset_items", ["dataset_id", "position"]
    )
    op.drop_table("dataset_versions")
    op.alter_column("datasets", "current_version", new_column_name="revision")

    op.drop_table("experiment_units")
    op.drop_table("experiment_totals")
    op.drop_table("experiment_watermarks")
    op.drop_table("experiment_feedback_changes")
    op.drop_index(
        "ix_experiment_records_experiment_id_variant_id_score_id",
        table_name="experiment_records",
    )
    op.drop_index(
        "ix_experiment_records_experiment_id_commit_stamp", table_name="experiment_records"
    )
    for name, _ in _DIFFS:
        op.drop_column("experiment_records", name)
    op.drop_column("experiment_records", "commit_stamp")

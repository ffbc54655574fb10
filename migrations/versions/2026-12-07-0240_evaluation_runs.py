"""Evaluations: suites of test cases, runs, a case's target, and results kept once per run.

Revision ID: 3c1f0e7a9b42
Revises: 8d2e6b4f1a9c
Create Date: 2026-12-07 01:53:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "3c1f0e7a9b42"
down_revision: str | Sequence[str] | None = "8d2e6b4f1a9c"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "test_suites",
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("default_target", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("judge_model", sa.String(length=64), nullable=True),
        sa.Column("embedding_model", sa.String(length=64), nullable=True),
        sa.Column("pass_threshold", sa.Float(), nullable=False),
        sa.Column("case_threshold", sa.Float(), nullable=True),
        sa.Column("concurrency", sa.Integer(), nullable=False),
        sa.Column("tags", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_test_suites")),
    )
    op.create_table(
        "test_runs",
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("suite_id", sa.String(length=64), nullable=True),
        sa.Column("test_case_id", sa.String(length=64), nullable=True),
        sa.Column("operation_id", sa.String(length=64), nullable=True),
        sa.Column("owner_key_id", sa.String(length=64), nullable=True),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("cases", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("settings", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("summary", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["suite_id"],
            ["test_suites.id"],
            name=op.f("fk_test_runs_suite_id_test_suites"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["test_case_id"],
            ["test_cases.id"],
            name=op.f("fk_test_runs_test_case_id_test_cases"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_test_runs")),
    )
    op.create_index(
        "ix_test_runs_suite_id_created_at", "test_runs", ["suite_id", "created_at"], unique=False
    )
    op.create_index(
        "ix_test_runs_test_case_id_created_at",
        "test_runs",
        ["test_case_id", "created_at"],
        unique=False,
    )
    op.create_table(
        "test_suite_cases",
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("suite_id", sa.String(length=64), nullable=False),
        sa.Column("test_case_id", sa.String(length=64), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["suite_id"],
            ["test_suites.id"],
            name=op.f("fk_test_suite_cases_suite_id_test_suites"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["test_case_id"],
            ["test_cases.id"],
            name=op.f("fk_test_suite_cases_test_case_id_test_cases"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_test_suite_cases")),
        sa.UniqueConstraint(
            "suite_id", "test_case_id", name=op.f("uq_test_suite_cases_suite_id_test_case_id")
        ),
    )
    op.create_index(
        op.f("ix_test_suite_cases_test_case_id"), "test_suite_cases", ["test_case_id"], unique=False
    )
    # Nothing wrote results before this revision (test cases had no runner), and a row would
    # have no run to belong to.
    op.execute("DELETE FROM test_case_results")
    op.add_column("test_case_results", sa.Column("outcome", sa.String(length=32), nullable=False))
    op.add_column("test_case_results", sa.Column("model", sa.String(length=64), nullable=True))
    op.add_column("test_case_results", sa.Column("cost_micros", sa.BigInteger(), nullable=True))
    op.drop_index(op.f("ix_test_case_results_test_case_id_run_id"), table_name="test_case_results")
    op.create_unique_constraint(
        op.f("uq_test_case_results_test_case_id_run_id"),
        "test_case_results",
        ["test_case_id", "run_id"],
    )
    op.create_foreign_key(
        op.f("fk_test_case_results_run_id_test_runs"),
        "test_case_results",
        "test_runs",
        ["run_id"],
        ["id"],
        ondelete="CASCADE",
    )
    op.add_column(
        "test_cases", sa.Column("target", postgresql.JSONB(astext_type=sa.Text()), nullable=True)
    )
    op.add_column("test_cases", sa.Column("threshold", sa.Float(), nullable=True))


def downgrade() -> None:
    op.drop_column("test_cases", "threshold")
    op.drop_column("test_cases", "target")
    op.drop_constraint(
        op.f("fk_test_case_results_run_id_test_runs"), "test_case_results", type_="foreignkey"
    )
    op.drop_constraint(
        op.f("uq_test_case_results_test_case_id_run_id"), "test_case_results", type_="unique"
    )
    op.create_index(
        op.f("ix_test_case_results_test_case_id_run_id"),
        "test_case_results",
        ["test_case_id", "run_id"],
        unique=False,
    )
    op.drop_column("test_case_results", "cost_micros")
    op.drop_column("test_case_results", "model")
    op.drop_column("test_case_results", "outcome")
    op.drop_index(op.f("ix_test_suite_cases_test_case_id"), table_name="test_suite_cases")
    op.drop_table("test_suite_cases")
    op.drop_index("ix_test_runs_test_case_id_created_at", table_name="test_runs")
    op.drop_index("ix_test_runs_suite_id_created_at", table_name="test_runs")
    op.drop_table("test_runs")
    op.drop_table("test_suites")

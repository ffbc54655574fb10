"""The base of every persisted entity and the column helpers the domains declare them with."""

from __future__ import annotations

import enum
from datetime import datetime
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, SQLModel

from app.core.clock import utcnow

# Constraint names follow one convention so migrations can name (and drop) them reliably.
SQLModel.metadata.naming_convention = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Entity(SQLModel):
    """Fields every table has: creation and update instants (aware UTC) and a version."""

    created_at: datetime = Field(
        default_factory=utcnow, sa_type=sa.DateTime(timezone=True), nullable=False
    )
    updated_at: datetime = Field(
        default_factory=utcnow, sa_type=sa.DateTime(timezone=True), nullable=False
    )
    # Incremented by every update; an update carrying an older version is refused.
    version: int = Field(default=1, nullable=False)


def pk(*, max_length: int = 64) -> Any:
    """A string primary key."""
    return Field(primary_key=True, max_length=max_length)


def text(
    default: Any = ...,
    *,
    max_length: int | None = None,
    index: bool = False,
    unique: bool = False,
) -> Any:
    """A string column: VARCHAR(n) when bounded, TEXT otherwise."""
    sa_type: Any = sa.String(max_length) if max_length else sa.Text
    return Field(
        default=default, max_length=max_length, sa_type=sa_type, index=index, unique=unique
    )


def choice(enum_cls: type[enum.Enum], default: Any = ..., *, index: bool = False) -> Any:
    """An enum stored by value as VARCHAR, so adding a member needs no type migration."""
    width = max(32, *(len(str(m.value)) for m in enum_cls))
    return Field(default=default, sa_type=sa.String(width), index=index)


def instant(*, index: bool = False, default_now: bool = False) -> Any:
    """An aware UTC timestamp (timestamptz); nullable unless it defaults to now."""
    if default_now:
        return Field(default_factory=utcnow, sa_type=sa.DateTime(timezone=True), index=index)
    return Field(default=None, sa_type=sa.DateTime(timezone=True), index=index)


# Default factories are plain functions, not the `dict` and `list` builtins: pydantic inspects a
# factory's signature on every construction, and a builtin's costs a parse of its text signature
# (about a fifth of the CPU of submitting a job went there).
def _empty_object() -> dict[str, Any]:
    return {}


def _empty_list() -> list[Any]:
    return []


def json_object() -> Any:
    """A JSONB object for nested, schemaless parts."""
    return Field(default_factory=_empty_object, sa_type=JSONB, nullable=False)


def json_list() -> Any:
    """A JSONB array for nested, schemaless parts."""
    return Field(default_factory=_empty_list, sa_type=JSONB, nullable=False)


def json_value() -> Any:
    """Any JSON value, or null."""
    return Field(default=None, sa_type=JSONB, nullable=True)


def binary() -> Any:
    """Raw bytes (BYTEA): packed vectors, uploaded files."""
    return Field(sa_type=sa.LargeBinary, nullable=False)


def money(default: Decimal | None = Decimal(0)) -> Any:
    """A decimal amount with six places (USD per million tokens and the like)."""
    return Field(default=default, sa_type=sa.Numeric(18, 6), nullable=default is None)


def big(default: int | None = 0, *, index: bool = False) -> Any:
    """A 64-bit integer (micro-dollars, byte counts)."""
    return Field(default=default, sa_type=sa.BigInteger, nullable=default is None, index=index)


# The column `commit_stamp()` declares: a commit-order stamp every backend writes on insert.
COMMIT_STAMP_INFO = "commit_stamp"


def commit_stamp() -> Any:
    """A commit-order stamp, written by the backend when the row is inserted and never
    changed: a row committed after `UnitOfWork.commit_horizon()` returned h is stamped h or
    above. On PostgreSQL the inserting transaction's id, on the memory backend a counter
    stepped at each commit. None on an entity not yet read back."""
    return Field(
        default=None,
        sa_type=sa.BigInteger,
        nullable=True,
        sa_column_kwargs={
            "server_default": sa.text("pg_current_xact_id()::text::bigint"),
            "info": {COMMIT_STAMP_INFO: True},
        },
    )


def reference(
    target: str, *, on_delete: str = "CASCADE", nullable: bool = False, index: bool = True
) -> Any:
    """A foreign key to `target` ("table.column"); the memory backend honours it the same way."""
    return Field(
        default=None if nullable else ...,
        sa_column_args=[sa.ForeignKey(target, ondelete=on_delete)],
        sa_type=sa.String(64),
        nullable=nullable,
        index=index,
        max_length=64,
    )

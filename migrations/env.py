"""Alembic entry point: the target is every table in `app.schema`, on PostgreSQL via psycopg 3."""

from __future__ import annotations

from logging.config import fileConfig
from typing import Any, Literal

import psycopg
import sqlalchemy as sa
from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlmodel import SQLModel
from sqlmodel.sql.sqltypes import AutoString

import app.schema  # noqa: F401  (registers every table in SQLModel.metadata)
from app.config import Settings
from app.storage.database_url import parse_database_url

config = context.config
# The advisory lock that serialises concurrent migrations of one database ("gateway\0" in hex).
LOCK = 0x6761746577617900
target_metadata = SQLModel.metadata

# Called from `app.storage.migrate`, the host process keeps its own logging.
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def database_url() -> str:
    """`-x url=…` first, then the URL a caller put in the config, then DATABASE_URL."""
    url = context.get_x_argument(as_dictionary=True).get("url")
    return str(url or config.attributes.get("database_url") or Settings().DATABASE_URL)


def render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    """Render SQLModel's string type as a plain `sa.String`, so revisions import no app code."""
    if type_ == "type" and isinstance(obj, AutoString):
        return f"sa.String(length={obj.length})" if obj.length else "sa.String()"
    return False


def run_migrations_offline() -> None:
    """Write the SQL to stdout (`alembic upgrade head --sql`)."""
    context.configure(
        url="postgresql+psycopg://",  # only the dialect: the SQL is written, not run
        target_metadata=target_metadata,
        literal_binds=True,
        compare_type=True,
        render_item=render_item,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the migrations on a connection of their own, in one transaction.

    Migrations run synchronously, on SQLAlchemy's psycopg 3 dialect; libpq reads the URL itself
    (host lists, sslmode, application_name, options…), as the gateway checked it.
    """
    conninfo = parse_database_url(database_url()).libpq
    engine = sa.create_engine(
        "postgresql+psycopg://", creator=lambda: psycopg.connect(conninfo), poolclass=sa.NullPool
    )
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                compare_type=True,
                render_item=render_item,
            )
            with context.begin_transaction():
                # Processes that migrate as they start (Procfile) take turns: the later ones
                # find the schema at head and have nothing to do. Released at commit.
                connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK})
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()

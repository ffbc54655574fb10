"""Creating the database DATABASE_URL names when its server has none of that name, so that
`gateway migrate` sets up a fresh server by itself."""

from __future__ import annotations

import shlex

import psycopg
from psycopg import errors, sql
from psycopg.rows import TupleRow

from app.core.database_url import DatabaseUrl

# Where a connection goes to create another database, in the order `createdb` tries them.
MAINTENANCE_DATABASES = ("postgres", "template1")


class CannotCreateDatabase(Exception):
    """The database is missing and cannot be created with these credentials; the message says
    what to run instead."""


def create_database_if_missing(url: DatabaseUrl) -> str | None:
    """Create the database `url` names if its server lacks it: the host it was created on, or
    None when it was there already. A connection failing for another reason is raised as is."""
    try:
        psycopg.connect(url.libpq).close()
        return None
    except psycopg.OperationalError as exc:
        refused = exc
    if not url.database:
        raise refused
    # The message of the refusal is in the server's language: ask its catalogue instead.
    admin = _maintenance_connection(url)
    if admin is None:
        raise refused
    with admin:
        name = url.database
        found = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        if found.fetchone() is not None:
            # There now: another `gateway migrate` may have created it meanwhile. If it still
            # refuses this connection, that was the reason all along.
            psycopg.connect(url.libpq).close()
            return None
        try:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        except (errors.DuplicateDatabase, errors.UniqueViolation):
            # Another `gateway migrate` created it meanwhile (one that commits while this
            # CREATE DATABASE runs shows as a unique violation on the catalogue).
            return None
        except errors.InsufficientPrivilege as exc:
            info = admin.info
            createdb = f"createdb -h {info.host} -p {info.port} -U postgres {shlex.quote(name)}"
            raise CannotCreateDatabase(
                f"database {name} does not exist on {info.host}, and user {info.user} may not "
                f"create it ({exc.diag.message_primary}). Create it as a user who may, e.g. "
                f"`{createdb}` (or grant {info.user} CREATEDB), then run gateway migrate again."
            ) from exc
        return admin.info.host


def _maintenance_connection(url: DatabaseUrl) -> psycopg.Connection[TupleRow] | None:
    """A connection to the server's maintenance database, with the URL's credentials and
    options, or None when none of them admits it."""
    for name in MAINTENANCE_DATABASES:
        try:
            return psycopg.connect(url.libpq, dbname=name, autocommit=True)
        except psycopg.OperationalError:
            continue
    return None

"""The PostgreSQL backend: SQL built once per table from the SQLModel metadata, run on asyncpg
connections from `app.storage.pool`.

SQLAlchemy describes the tables (and Alembic migrates them); statements do not go through its
execution layer, which cost about twice the CPU of the driver itself on every statement.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any, Generic

import asyncpg
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from app.core.clock import utcnow
from app.core.database_url import parse_database_url
from app.core.errors import (
    DomainError,
    DuplicateKey,
    InvalidInput,
    NotFound,
    ReferenceViolation,
    StaleVersion,
    Unavailable,
)
from app.storage.entity import Entity
from app.storage.mapping import (
    TableInfo,
    check_changes,
    check_column,
    decode_cursor,
    encode_cursor,
    find_order,
    from_row,
    json_dumps,
    json_loads,
    numeric_column,
    table_info,
    to_row,
)
from app.storage.pool import ConnectionPool
from app.storage.protocol import (
    Append,
    E,
    IfNull,
    Increment,
    Moments,
    Op,
    Page,
    Summary,
    Tally,
    Where,
)
from app.storage.unit import UnitOfWorkBase

# Connections free for this long are closed: a quiet process holds few.
IDLE_LIFETIME = 60.0
# Connections older than this are closed when given back, so that a process follows a failover
# or a moved proxy, and no server-side memory grows for the life of the process.
MAX_LIFETIME = 1800.0


async def _prepare(conn: asyncpg.Connection) -> None:
    """Every pooled connection: JSON through orjson, both ways."""
    for name in ("jsonb", "json"):
        await conn.set_type_codec(
            name, schema="pg_catalog", encoder=json_dumps, decoder=json_loads, format="text"
        )


_BEGIN = "BEGIN"
# One simple query, so one round trip: the transaction's commit does not wait for the WAL flush.
_BEGIN_RELAXED = "BEGIN; SET LOCAL synchronous_commit TO off"
# A condition that is always true and sets the same for the implicit transaction of the one
# statement it is part of (the setting is read when that transaction commits).
_RELAXED = "set_config('synchronous_commit', 'off', true) IS NOT NULL"

# Seconds the client waits beyond the server's statement timeout before giving up on the link.
CLIENT_TIMEOUT_MARGIN = 2.0


class Database:
    """The connections to one database, opened in the event loop that first uses them.

    A `connect_timeout` in the URL takes the place of the `connect_timeout` argument. Without
    `statement_cache`, asyncpg prepares no named statements, which a PgBouncer in transaction
    pooling mode could not keep on the connection they were prepared on.
    """

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 10,
        max_overflow: int = 10,
        connect_timeout: float = 5.0,
        idle_lifetime: float = IDLE_LIFETIME,
        max_lifetime: float | None = MAX_LIFETIME,
        statement_cache: bool = True,
        statement_timeout: float = 0.0,
    ) -> None:
        parsed = parse_database_url(url)
        self.dsn = parsed.asyncpg
        self.max_size = pool_size + max_overflow
        self.connect_timeout = parsed.connect_timeout or connect_timeout
        self._options: dict[str, Any] = {
            "timeout": self.connect_timeout,
            "server_settings": {**parsed.server_settings, "timezone": "UTC"},
        }
        if not statement_cache:
            self._options["statement_cache_size"] = 0
        given = parsed.server_settings.get("statement_timeout", "")
        if given.isdigit():  # milliseconds, from DATABASE_URL's options: that one rules
            statement_timeout = int(given) / 1000
        elif statement_timeout > 0 and not given:
            self._options["server_settings"]["statement_timeout"] = str(
                round(statement_timeout * 1000)
            )
        if statement_timeout > 0:
            # The server's own cancellation comes first and keeps the connection; this bounds a
            # wait on a link that went silent (the connection is then dropped).
            self._options["command_timeout"] = statement_timeout + CLIENT_TIMEOUT_MARGIN
        self._pool = ConnectionPool(
            self._connect,
            max_size=self.max_size,
            timeout=self.connect_timeout,
            idle_lifetime=idle_lifetime,
            max_lifetime=max_lifetime,
        )

    @property
    def pool(self) -> ConnectionPool:
        return self._pool

    async def acquire(self) -> asyncpg.Connection:
        """A connection; give it back with `release`."""
        return await self._pool.acquire()

    def release(self, conn: asyncpg.Connection) -> None:
        self._pool.release(conn)

    def discard(self, conn: asyncpg.Connection) -> None:
        """Give back a connection that failed: it (and the free ones) will not be used again."""
        self._pool.discard(conn)

    async def _connect(self) -> asyncpg.Connection:
        conn: asyncpg.Connection = await asyncpg.connect(self.dsn, **self._options)
        try:
            await _prepare(conn)
        except BaseException:
            conn.terminate()
            raise
        return conn

    async def close(self) -> None:
        """Close every connection: those in use once they come back, within a few seconds."""
        await self._pool.close()


def make_database(
    url: str,
    *,
    pool_size: int = 10,
    max_overflow: int = 10,
    connect_timeout: float = 5.0,
    max_lifetime: float | None = MAX_LIFETIME,
    statement_cache: bool = True,
    statement_timeout: float = 0.0,
) -> Database:
    """One pool per process (and per event loop): `pool_size + max_overflow` connections at most."""
    return Database(
        url,
        pool_size=pool_size,
        max_overflow=max_overflow,
        connect_timeout=connect_timeout,
        max_lifetime=max_lifetime,
        statement_cache=statement_cache,
        statement_timeout=statement_timeout,
    )


_DIALECT = postgresql.dialect()  # type: ignore[no-untyped-call]

_PLACEHOLDER = re.compile(r"%\((\w+)\)s")


@lru_cache(maxsize=4096)
def _positional(query: str) -> tuple[str, tuple[str, ...]]:
    """`… %(name)s …` as asyncpg takes it (`$1`), with the names in order."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    return _PLACEHOLDER.sub(number, query), tuple(names)


def _holds_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_holds_nul(k) or _holds_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_holds_nul(v) for v in value)
    return False


_CONDITION_PARAM = re.compile(r"_[ca]\d+_(\w+)")


def _column_of(name: str, info: TableInfo | None) -> str | None:
    """The column a parameter stands for: values are named after their column, conditions'
    as `_c<n>_<column>`, the rows `write_where_adding` adds as `_a<n>_<column>`, the key as
    `_key`; the others stand for none."""
    if name == "_key":
        return info.pk if info is not None else None
    condition = _CONDITION_PARAM.fullmatch(name)
    if condition is not None:
        return condition.group(1)
    return None if name.startswith("_") else name


def _nul_param(params: Sequence[Mapping[str, Any]], info: TableInfo | None) -> str | None:
    """The column whose value holds a NUL character (which PostgreSQL text and jsonb refuse)."""
    for row in params:
        for name, value in row.items():
            if _holds_nul(value):
                return _column_of(name, info)
    return None


_ARGUMENT = re.compile(r"query argument \$(\d+)")
_ClientDataError = asyncpg.exceptions._base.DataError  # not the server's class-22 DataError


def _refused_argument(exc: BaseException) -> bool:
    """An argument the driver could not encode: nothing reached the server."""
    return isinstance(exc, _ClientDataError) or (
        isinstance(exc, asyncpg.PostgresError | _ClientDataError)
        and _ARGUMENT.search(str(exc)) is not None
    )


_InternalClientError = asyncpg.exceptions._base.InternalClientError


def _lost_connection(exc: BaseException) -> bool:
    """An error after which the connection must not be used again, though it may not know yet
    that it is dead: the socket failed, the server reported the connection broken (class 08) or
    its session ended (57P01 administrator command, 57P02 crash, 57P05 idle timeout…), or the
    driver is stuck after a message it did not expect (the server's last words, read before
    the end of the stream)."""
    if isinstance(exc, OSError | TimeoutError | _InternalClientError):
        return True  # a statement given up on by the client may still be running
    state = getattr(exc, "sqlstate", None) if isinstance(exc, asyncpg.PostgresError) else None
    return state is not None and state.startswith(("08", "57P"))


def _translate(
    exc: Exception,
    info: TableInfo | None,
    params: Sequence[Mapping[str, Any]] = (),
    names: Sequence[str] = (),
) -> DomainError:
    """Map a driver error to the domain error the memory backend raises for the same cause."""
    kind = info.kind if info is not None else "transaction"
    if _refused_argument(exc):
        # Refused before it was sent: a value the column's type cannot carry (say, an integer
        # past 64 bits); the message names the argument.
        found = _ARGUMENT.search(str(exc))
        field = None
        if found and 0 < int(found.group(1)) <= len(names):
            field = _column_of(names[int(found.group(1)) - 1], info)
        field = field or _nul_param(params, info)
        return InvalidInput(f"{field or kind}: {exc}", param=field)
    if isinstance(exc, asyncpg.PostgresError):
        state = exc.sqlstate
        detail = str(getattr(exc, "detail", None) or getattr(exc, "message", None) or exc)
        if state == "23505":
            return DuplicateKey(f"{kind} already exists: {detail}")
        if state == "23503":
            return ReferenceViolation(f"{kind}: {detail}")
        if state is not None and state.startswith(("22", "23")):
            field = _nul_param(params, info)
            if field is not None:
                return InvalidInput(
                    f"{field}: text cannot contain NUL (\\u0000) characters", param=field
                )
            return InvalidInput(f"{kind}: {detail}")
        if state in ("40001", "40P01"):
            # A serialization failure or a deadlock: the transaction lost to a concurrent one,
            # as a stale version does, and whoever retries those retries this too.
            return StaleVersion(kind, "*", 0)
        if state is not None and state.startswith(("08", "53", "57")):
            return Unavailable(f"database unavailable: {type(exc).__name__}")
        if state in ("3D000", "42P01"):
            # No such database, or no such table: a database `gateway migrate` has not set up
            # (yet: processes may start while it runs).
            return Unavailable(f"database not migrated (run gateway migrate): {detail}")
        raise exc
    if isinstance(exc, OSError | TimeoutError | asyncpg.InterfaceError | _InternalClientError):
        return Unavailable(f"database unavailable: {type(exc).__name__}")
    raise exc


class SqlStorage:
    """The PostgreSQL backend."""

    name = "postgres"

    def __init__(self, database: Database) -> None:
        self.database = database

    def unit_of_work(self, *, autocommit: bool = False, durable: bool = True) -> SqlUnitOfWork:
        return SqlUnitOfWork(self.database, autocommit=autocommit, durable=durable)

    async def check(self) -> None:
        async with self.unit_of_work() as uow:
            await uow._fetch("SELECT 1", {}, None)

    async def close(self) -> None:
        await self.database.close()


class SqlUnitOfWork(UnitOfWorkBase):
    """One database transaction on one pooled connection.

    The transaction begins at the first write: reads before it run in autocommit, which saves
    the BEGIN and ROLLBACK round trips of the many units of work that only read. Under READ
    COMMITTED every statement takes a fresh snapshot anyway, so those reads see what they
    would have seen inside the transaction. With `autocommit`, writes run that way too.

    Not `durable`, a transaction begins with `SET LOCAL synchronous_commit TO off` in the
    round trip of its BEGIN, and an autocommit `update_where` or `write_where` sets it for its
    own implicit transaction by a condition of the statement: either way the commit returns
    without waiting for the WAL flush, at no extra round trip.
    """

    def __init__(
        self, database: Database, *, autocommit: bool = False, durable: bool = True
    ) -> None:
        super().__init__(autocommit=autocommit)
        self._database = database
        self.durable = durable
        self._conn: asyncpg.Connection | None = None
        self._in_transaction = False
        self._lost = False  # the connection failed: the pool must not hand it out again

    def repo(self, entity_type: type[E]) -> SqlRepository[E]:
        return SqlRepository(self, entity_type)

    async def rollback(self) -> None:
        self._done = True
        self._callbacks.clear()
        await self._release()

    async def commit(self) -> None:
        self._usable()
        self._done = True
        try:
            if self._in_transaction and self._conn is not None:
                try:
                    await self._conn.execute("COMMIT")
                except (
                    asyncpg.PostgresError,
                    asyncpg.InterfaceError,
                    _InternalClientError,
                    OSError,
                ) as exc:
                    self._lost = _lost_connection(exc)
                    raise _translate(exc, info=None) from exc
                self._in_transaction = False
        finally:
            await self._release()
        await self._run_callbacks()

    async def commit_horizon(self) -> int:
        rows = await self._fetch(_HORIZON, {}, None)
        return int(rows[0][0])

    async def _release(self) -> None:
        conn, self._conn = self._conn, None
        self._in_transaction = False
        if conn is None:
            return
        # A unit that leaves with its transaction open (an error, a cancellation) rolls it back;
        # a connection that cannot, or that failed, is closed, and the pool opens another when
        # one is needed.
        try:
            if not self._lost and conn.is_in_transaction() and not conn.is_closed():
                await conn.execute("ROLLBACK")
        except _DRIVER_ERRORS:
            # The server drops the transaction of a connection that ends.
            self._lost = True
        except BaseException:
            conn.terminate()
            raise
        finally:
            if self._lost:
                self._database.discard(conn)
            else:
                self._database.release(conn)

    async def _connection(self, write: bool) -> asyncpg.Connection:
        conn = self._conn
        if conn is None:
            conn = await self._database.acquire()
            self._conn = conn
        if write and not self._autocommit and not self._in_transaction:
            await conn.execute(_BEGIN if self.durable else _BEGIN_RELAXED)
            self._in_transaction = True
        return conn

    def _failure(
        self,
        exc: Exception,
        info: TableInfo | None,
        params: Sequence[Mapping[str, Any]],
        names: Sequence[str] = (),
    ) -> DomainError:
        # A failed statement aborts the transaction; one refused before it was sent does not,
        # and a failed autocommit statement left nothing behind.
        self._failed = not self._autocommit and not _refused_argument(exc)
        self._lost = self._lost or _lost_connection(exc)
        if isinstance(exc, TypeError | ValueError) and not isinstance(exc, _ClientDataError):
            # A JSON value the serializer refuses.
            return InvalidInput(f"{info.kind if info else 'query'}: {exc}")
        return _translate(exc, info, params, names)

    async def _fetch(
        self,
        query: str,
        params: Mapping[str, Any],
        info: TableInfo | None,
        *,
        write: bool = False,
    ) -> list[asyncpg.Record]:
        """Run one statement and return its rows; driver errors become the domain's errors."""
        self._usable()
        sql, names = _positional(query)
        try:
            conn = await self._connection(write)
            rows: list[asyncpg.Record] = await conn.fetch(sql, *[params[n] for n in names])
            return rows
        except _DRIVER_ERRORS as exc:
            raise self._failure(exc, info, [params], names) from exc

    async def _execute(
        self, query: str, params: Mapping[str, Any], info: TableInfo, *, write: bool = True
    ) -> int:
        """Run one statement; how many rows it touched."""
        self._usable()
        sql, names = _positional(query)
        try:
            conn = await self._connection(write)
            status = await conn.execute(sql, *[params[n] for n in names])
        except _DRIVER_ERRORS as exc:
            raise self._failure(exc, info, [params], names) from exc
        count = status.rsplit(" ", 1)[-1]
        return int(count) if count.isdigit() else 0

    async def _execute_many(
        self, query: str, rows: Sequence[Mapping[str, Any]], info: TableInfo
    ) -> None:
        """Run one statement once per parameter set (pipelined by the driver)."""
        self._usable()
        sql, names = _positional(query)
        try:
            conn = await self._connection(True)
            await conn.executemany(sql, [[row[n] for n in names] for row in rows])
        except _DRIVER_ERRORS as exc:
            error = self._failure(exc, info, rows, names)
            # Rows are encoded as they are sent: inside a transaction, those before a refused
            # one were written, so only a rollback leaves none of them.
            self._failed = self._failed or self._in_transaction
            raise error from exc

    async def _fetch_many(
        self, query: str, rows: Sequence[Mapping[str, Any]], info: TableInfo
    ) -> list[asyncpg.Record]:
        """`_execute_many`, returning the rows every execution returned."""
        self._usable()
        sql, names = _positional(query)
        try:
            conn = await self._connection(True)
            found: list[asyncpg.Record] = await conn.fetchmany(
                sql, [[row[n] for n in names] for row in rows]
            )
            return found
        except _DRIVER_ERRORS as exc:
            error = self._failure(exc, info, rows, names)
            self._failed = self._failed or self._in_transaction
            raise error from exc


_DRIVER_ERRORS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    _InternalClientError,
    OSError,
    TimeoutError,
    TypeError,
    ValueError,
)


# ---- statements ------------------------------------------------------------------------------


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True)
class _Table:
    """One table's statement text, built once from its metadata."""

    names: tuple[str, ...]  # every column, in the order the statements select them
    select: str  # SELECT every column FROM the table
    get: str
    insert: str
    insert_missing: str
    update: str
    returning: str

    def row(self, values: Sequence[Any]) -> dict[str, Any]:
        return dict(zip(self.names, values, strict=True))


_XACT_ID = "pg_current_xact_id()::text::bigint"
# Every transaction with a lower id has ended: any row inserted from now on has a higher one.
_HORIZON = "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint"


@cache
def _table(info: TableInfo) -> _Table:
    names = tuple(c.name for c in info.table.columns)
    columns = ", ".join(_q(n) for n in names)
    table, pk = _q(info.name), _q(info.pk)
    settable = [n for n in names if n not in (info.pk, "created_at", info.stamp)]
    returning = f"RETURNING {columns}"
    # The commit stamp is the inserting transaction's id, whatever the entity carries.
    values = [_XACT_ID if n == info.stamp else f"%({n})s" for n in names]
    insert = f"INSERT INTO {table} ({columns}) VALUES ({', '.join(values)})"
    return _Table(
        names=names,
        select=f"SELECT {columns} FROM {table}",
        get=f"SELECT {columns} FROM {table} WHERE {pk} = %(_key)s",
        insert=insert,
        insert_missing=f"{insert} ON CONFLICT ({pk}) DO NOTHING RETURNING {pk}",
        update=(
            f"UPDATE {table} SET {', '.join(f'{_q(n)} = %({n})s' for n in settable)} "
            f"WHERE {pk} = %(_key)s AND version = %(_expected)s {returning}"
        ),
        returning=returning,
    )


_COMPARE = {Op.EQ: "=", Op.NE: "<>", Op.LT: "<", Op.LE: "<=", Op.GT: ">", Op.GE: ">="}


def _conditions(info: TableInfo, where: Sequence[Where], params: dict[str, Any]) -> list[str]:
    """SQL for each condition, its value added to `params` as `_c<n>_<column>`."""
    clauses = []
    for cond in where:
        check_column(info, cond.field)
        column = _q(cond.field)
        if cond.field in info.json_columns:
            if cond.op is not Op.IS_NULL:
                raise ValueError(f"cannot filter {info.kind} on JSON column {cond.field!r}")
            # A JSON null written before NULLs were stored as SQL NULL counts as null too.
            null = f"({column} IS NULL OR {column} = 'null'::jsonb)"
            clauses.append(null if cond.value else f"NOT {null}")
            continue
        if cond.op is Op.IS_NULL:
            clauses.append(f"{column} IS NULL" if cond.value else f"{column} IS NOT NULL")
            continue
        name = f"_c{len(params) + 1}_{cond.field}"  # never a column's own name
        if cond.op is Op.IN:
            values = [getattr(v, "value", v) for v in cond.value]
            if not values:
                clauses.append("FALSE")
                continue
            params[name] = values
            clauses.append(f"{column} = ANY(%({name})s)")
            continue
        params[name] = getattr(cond.value, "value", cond.value)
        clauses.append(f"{column} {_COMPARE[cond.op]} %({name})s")
    return clauses


def _after(keys: list[tuple[str, bool]], values: list[Any], params: dict[str, Any]) -> str:
    """Rows strictly after `values` in the order `keys` (keyset pagination)."""
    names = []
    for i, value in enumerate(values):
        names.append(f"_after_{i}")
        params[f"_after_{i}"] = value
    alternatives = []
    for i, (column, desc) in enumerate(keys):
        equal = [f"{_q(n)} = %({names[j]})s" for j, (n, _) in enumerate(keys[:i])]
        step = f"{_q(column)} {'<' if desc else '>'} %({names[i]})s"
        alternatives.append("(" + " AND ".join([*equal, step]) + ")")
    return "(" + " OR ".join(alternatives) + ")"


def _present(column: str, json: bool) -> str:
    """The column's value, with a JSON null written by earlier versions read as SQL NULL."""
    return f"NULLIF({column}, 'null'::jsonb)" if json else column


def _assignment(info: TableInfo, name: str, params: dict[str, Any]) -> str:
    """`column = …` for one change of `update_where`, its operand left in `params`."""
    column, change = _q(name), params[name]
    json = name in info.json_columns
    if isinstance(change, Increment):
        params[name] = change.by
        return f"{column} = COALESCE({column}, 0) + %({name})s"
    if isinstance(change, Append):
        params[name] = list(change.items)
        return f"{column} = COALESCE({_present(column, json)}, '[]'::jsonb) || %({name})s::jsonb"
    if isinstance(change, IfNull):
        params[name] = change.value
        return f"{column} = COALESCE({_present(column, json)}, %({name})s)"
    return f"{column} = %({name})s"


# Up to this many rows of one table travel as one parameter per value; more, as one array per
# column (PostgreSQL takes at most 65,535 parameters in a statement).
_VALUES_ROWS = 32


@cache
def _adding(info: TableInfo, group: int, count: int) -> str:
    """The insert of `write_where_adding`'s `count` rows of one table (the `group`-th), inserted
    only if `_written` holds a row, from a VALUES list or, past `_VALUES_ROWS` rows, from one
    array per column. Each value is cast to its column's type (JSON as text, holding a JSON
    document). Scalar parameters where they can: the driver encodes an array with several type
    checks per element, which cost more than the rest of the statement; the statement's text,
    so its prepared plan, is one per number of rows up to `_VALUES_ROWS`, then one."""
    names = tuple(c.name for c in info.table.columns)
    casts = [(n, _value_type(info, n)) for n in names]
    if count <= _VALUES_ROWS:
        rows = ", ".join(
            "(" + ", ".join(f"%({_value_param(group, r, n)})s::{kind}" for n, kind in casts) + ")"
            for r in range(count)
        )
        source = f"(VALUES {rows})"
    else:
        arrays = ", ".join(f"%({_value_param(group, None, n)})s::{kind}[]" for n, kind in casts)
        source = f"unnest({arrays})"
    # The commit stamp is the inserting transaction's id, as for any insert (`_table`).
    values = ", ".join(
        _XACT_ID if n == info.stamp else f"{_q(n)}::jsonb" if n in info.json_columns else _q(n)
        for n in names
    )
    columns = ", ".join(_q(n) for n in names)
    return (
        f"INSERT INTO {_q(info.name)} ({columns}) SELECT {values} FROM {source} "
        f'AS "_rows"({columns}) WHERE EXISTS (SELECT FROM "_written") '
        f"ON CONFLICT ({_q(info.pk)}) DO NOTHING RETURNING {_q(info.pk)}"
    )


def _value_param(group: int, row: int | None, column: str) -> str:
    return f"_a{group}_{column}" if row is None else f"_a{group}_{row}_{column}"


_MODIFIERS = re.compile(r"\(.*\)")


def _value_type(info: TableInfo, column: str) -> str:
    """The type a column's value travels in: the column's type without its length or
    precision (a cast to `varchar(n)` would cut a longer value, where the insert refuses it),
    JSON as text."""
    if column in info.json_columns:
        return "text"
    kind = info.table.columns[column].type.compile(dialect=_DIALECT)
    return _MODIFIERS.sub("", kind).strip()


def _values_of(info: TableInfo, group: int, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The parameters of `rows` of one table, as `_adding` takes them: one per value, or one
    list per column; JSON encoded here."""
    json_columns = info.json_columns
    encoded = [
        {n: _json_param(info, n, v) if n in json_columns else v for n, v in row.items()}
        for row in rows
    ]
    if len(rows) > _VALUES_ROWS:
        names = [c.name for c in info.table.columns]
        return {_value_param(group, None, n): [row[n] for row in encoded] for n in names}
    return {_value_param(group, r, n): v for r, row in enumerate(encoded) for n, v in row.items()}


def _json_param(info: TableInfo, name: str, value: Any) -> str | None:
    if value is None:
        return None
    try:
        return json_dumps(value)
    except TypeError as exc:
        raise InvalidInput(
            f"{info.kind}.{name} is not JSON-serialisable: {exc}", param=name
        ) from exc


def _where(clauses: Sequence[str]) -> str:
    return f" WHERE {' AND '.join(clauses)}" if clauses else ""


class SqlRepository(Generic[E]):
    """The generic repository over one entity type in a `SqlUnitOfWork`."""

    def __init__(self, uow: SqlUnitOfWork, entity_type: type[E]) -> None:
        self._uow = uow
        self._type = entity_type
        self._info = table_info(entity_type)
        self._sql = _table(self._info)

    def _entity(self, values: Sequence[Any]) -> E:
        return from_row(self._type, self._sql.row(values))

    async def get(self, entity_id: Any) -> E | None:
        found = await self._uow._fetch(self._sql.get, {"_key": entity_id}, self._info)
        return self._entity(found[0]) if found else None

    async def get_many(self, ids: Sequence[Any]) -> list[E]:
        if not ids:
            return []
        query = f"{self._sql.select} WHERE {_q(self._info.pk)} = ANY(%(_keys)s)"
        rows = await self._uow._fetch(query, {"_keys": list(ids)}, self._info)
        found = {e.__dict__[self._info.pk]: e for e in map(self._entity, rows)}
        return [found[i] for i in ids if i in found]

    async def add(self, entity: E) -> E:
        row = to_row(entity)
        await self._uow._execute(self._sql.insert, row, self._info)
        return self._copy(row)

    def _copy(self, row: dict[str, Any]) -> E:
        """The entity of a row just written, sharing no nested value with the caller's."""
        copied = dict(row)
        for name in self._info.json_columns:
            if copied[name] is not None:
                copied[name] = json_loads(json_dumps(copied[name]))
        return from_row(self._type, copied)

    async def add_many(self, entities: Sequence[E]) -> int:
        if not entities:
            return 0
        rows = [to_row(e) for e in entities]
        await self._uow._execute_many(self._sql.insert, rows, self._info)
        return len(rows)

    async def add_missing(self, entities: Sequence[E]) -> list[Any]:
        if not entities:
            return []
        rows = [to_row(e) for e in entities]
        inserted = await self._uow._fetch_many(self._sql.insert_missing, rows, self._info)
        return [r[0] for r in inserted]

    async def update(self, entity: E) -> E:
        row = to_row(entity)
        key, expected = row.pop(self._info.pk), row.pop("version")
        row.pop("created_at")
        row.update(version=expected + 1, updated_at=utcnow())
        row.update(_key=key, _expected=expected)
        stored = await self._uow._fetch(self._sql.update, row, self._info, write=True)
        if not stored:
            if not await self._uow._fetch(self._sql.get, {"_key": key}, self._info):
                raise NotFound(self._info.kind, key)
            raise StaleVersion(self._info.kind, key, expected)
        return self._entity(stored[0])

    async def update_where(
        self, entity_id: Any, changes: Mapping[str, Any], *where: Where
    ) -> E | None:
        query, params = self._update_where(entity_id, changes, where)
        query += f" {self._sql.returning}"
        stored = await self._uow._fetch(query, params, self._info, write=True)
        return self._entity(stored[0]) if stored else None

    async def write_where(self, entity_id: Any, changes: Mapping[str, Any], *where: Where) -> bool:
        query, params = self._update_where(entity_id, changes, where)
        return await self._uow._execute(query, params, self._info) > 0

    async def write_where_adding(
        self,
        entity_id: Any,
        changes: Mapping[str, Any],
        *where: Where,
        adding: Sequence[Entity],
    ) -> list[Any] | None:
        # One statement: the update, and an insert per entity type reading the update's
        # RETURNING, so that rows are added only if it applied.
        update, params = self._update_where(entity_id, changes, where)
        groups: dict[type[Entity], list[dict[str, Any]]] = {}
        for entity in adding:
            groups.setdefault(type(entity), []).append(to_row(entity))
        ctes = [f'"_written" AS ({update} RETURNING 1)']
        found = ['EXISTS (SELECT FROM "_written")']
        for i, (entity_type, rows) in enumerate(groups.items()):
            info = table_info(entity_type)
            ctes.append(f'"_added_{i}" AS ({_adding(info, i, len(rows))})')
            found.append(f'ARRAY(SELECT {_q(info.pk)} FROM "_added_{i}")')
            params.update(_values_of(info, i, rows))
        query = f"WITH {', '.join(ctes)} SELECT {', '.join(found)}"
        stored = await self._uow._fetch(query, params, self._info, write=True)
        if not stored or not stored[0][0]:
            return None
        new = {
            (t, k) for (t, _), keys in zip(groups.items(), stored[0][1:], strict=True) for k in keys
        }
        return [
            key
            for entity in adding
            if (type(entity), key := getattr(entity, table_info(type(entity)).pk)) in new
        ]

    def _update_where(
        self, entity_id: Any, changes: Mapping[str, Any], where: Sequence[Where]
    ) -> tuple[str, dict[str, Any]]:
        params = check_changes(self._type, changes)
        sets = [_assignment(self._info, name, params) for name in list(params)]
        sets += ["version = version + 1", "updated_at = %(_now)s"]
        clauses = [f"{_q(self._info.pk)} = %(_key)s"]
        checks = _conditions(self._info, where, params)
        if checks:
            # Checks of the one row the key finds, never a way to find it: as a condition the
            # planner cannot match to an index, so that it always takes the primary key. (A
            # claim's `status = 'pending'` on the (status, lease_expires_at) index read every
            # pending row, thousands under a backlog, when stale statistics made both look
            # alike.) A condition that is null is false either way.
            clauses.append(f"({' AND '.join(checks)}) IS TRUE")
        if self._uow._autocommit and not self._uow.durable:
            clauses.append(_RELAXED)
        params.update(_key=entity_id, _now=utcnow())
        query = f"UPDATE {_q(self._info.name)} SET {', '.join(sets)}{_where(clauses)}"
        return query, params

    async def update_all(self, changes: Mapping[str, Any], *where: Where) -> int:
        params = check_changes(self._type, changes)
        sets = [_assignment(self._info, name, params) for name in list(params)]
        sets += ["version = version + 1", "updated_at = %(_now)s"]
        clauses = _conditions(self._info, where, params)
        params["_now"] = utcnow()
        query = f"UPDATE {_q(self._info.name)} SET {', '.join(sets)}{_where(clauses)}"
        return await self._uow._execute(query, params, self._info)

    async def delete(self, entity_id: Any) -> bool:
        query = f"DELETE FROM {_q(self._info.name)} WHERE {_q(self._info.pk)} = %(_key)s"
        return bool(await self._uow._execute(query, {"_key": entity_id}, self._info))

    async def delete_where(self, *where: Where) -> int:
        params: dict[str, Any] = {}
        clauses = _conditions(self._info, where, params)
        query = f"DELETE FROM {_q(self._info.name)}{_where(clauses)}"
        return await self._uow._execute(query, params, self._info)

    async def find(
        self,
        *where: Where,
        order_by: Sequence[str] = (),
        limit: int | None = None,
        after: str | None = None,
    ) -> Page[E]:
        keys = find_order(self._info, order_by, limit, after, where)
        params: dict[str, Any] = {}
        clauses = _conditions(self._info, where, params)
        if after is not None:
            clauses.append(_after(keys, decode_cursor(keys, after), params))
        order = ", ".join(
            # Ascending puts NULLs last and descending first, as the memory backend does.
            f"{_q(n)} {'DESC' if d else 'ASC'}"
            for n, d in keys
        )
        query = f"{self._sql.select}{_where(clauses)} ORDER BY {order}"
        if limit is not None:
            query += f" LIMIT {int(limit) + 1}"
        rows = [self._sql.row(r) for r in await self._uow._fetch(query, params, self._info)]
        next_cursor = None
        if limit is not None and len(rows) > limit:
            rows = rows[:limit]
            next_cursor = encode_cursor(keys, rows[-1])
        return Page(items=[from_row(self._type, r) for r in rows], next_cursor=next_cursor)

    async def count(self, *where: Where) -> int:
        params: dict[str, Any] = {}
        clauses = _conditions(self._info, where, params)
        query = f"SELECT count(*) FROM {_q(self._info.name)}{_where(clauses)}"
        found = await self._uow._fetch(query, params, self._info)
        return int(found[0][0]) if found else 0

    async def count_by(
        self, field: str, *where: Where, least: str | None = None
    ) -> dict[Any, Tally]:
        check_column(self._info, field)
        if least is not None:
            check_column(self._info, least)
        params: dict[str, Any] = {}
        clauses = _conditions(self._info, where, params)
        minimum = f"min({_q(least)})" if least is not None else "NULL"
        query = (
            f"SELECT {_q(field)}, count(*), {minimum} FROM {_q(self._info.name)}"
            f"{_where(clauses)} GROUP BY {_q(field)}"
        )
        found = await self._uow._fetch(query, params, self._info)
        return {row[0]: Tally(int(row[1]), row[2]) for row in found}

    async def summarize(
        self,
        group_by: str,
        columns: Sequence[str],
        *where: Where,
        quantiles: Mapping[str, Sequence[float]] | None = None,
        distinct: Sequence[str] = (),
    ) -> dict[Any, Summary]:
        check_column(self._info, group_by)
        for name in distinct:
            check_column(self._info, name)
        kinds = {name: numeric_column(self._info, name) for name in columns}
        wanted = dict(quantiles or {})
        params: dict[str, Any] = {}
        clauses = _conditions(self._info, where, params)
        parts = [_q(group_by), "count(*)"]
        for name, kind in kinds.items():
            value, square = self._numeric(name)
            # Integer sums come back as numeric: exact, so variances computed from them are.
            total = f"sum({value})" if kind is int else f"sum({value}::float8)"
            squares = f"sum({square})" if kind is int else f"sum({value}::float8 * {value})"
            parts += [f"count({value})", total, squares, f"min({value})", f"max({value})"]
        for i, (name, fractions) in enumerate(wanted.items()):
            numeric_column(self._info, name)
            params[f"_quantiles_{i}"] = [float(f) for f in fractions]
            value, _ = self._numeric(name)
            parts.append(
                f"percentile_cont(%(_quantiles_{i})s::float8[]) "
                f"WITHIN GROUP (ORDER BY {value}::float8)"
            )
        query = (
            f"SELECT {', '.join(parts)} FROM {_q(self._info.name)}{_where(clauses)} "
            f"GROUP BY {_q(group_by)}"
        )
        found = await self._uow._fetch(query, params, self._info)
        summaries: dict[Any, Summary] = {}
        for row in found:
            moments: dict[str, Moments] = {}
            at = 2
            for name, kind in kinds.items():
                n, total, squares, least, most = row[at : at + 5]
                at += 5
                moments[name] = (
                    Moments(int(n), kind(total), kind(squares), least, most) if n else Moments()
                )
            cuts: dict[str, list[float | None]] = {}
            for name, fractions in wanted.items():
                values = row[at]
                at += 1
                cuts[name] = list(values) if values is not None else [None] * len(fractions)
            summaries[row[0]] = Summary(int(row[1]), moments, cuts, dict.fromkeys(distinct, 0))
        for name in distinct:
            # A hashed GROUP BY, then a count: `count(DISTINCT …)` sorts every group instead,
            # several times slower on large tables.
            query = (
                f"SELECT {_q(group_by)}, count(*) FROM (SELECT {_q(group_by)}, {_q(name)} "
                f"FROM {_q(self._info.name)}{_where([*clauses, f'{_q(name)} IS NOT NULL'])} "
                f"GROUP BY {_q(group_by)}, {_q(name)}) AS seen GROUP BY {_q(group_by)}"
            )
            for key, count in await self._uow._fetch(query, params, self._info):
                summaries[key].distinct[name] = int(count)
        return summaries

    def _numeric(self, name: str) -> tuple[str, str]:
        """A numeric column as `summarize` reads it (booleans as 0 and 1), and its square
        computed without overflow."""
        column = _q(name)
        kind = self._info.table.columns[name].type
        if isinstance(kind, sa.Boolean):
            return f"{column}::int", f"{column}::int::int8"
        if isinstance(kind, sa.BigInteger):
            return column, f"{column}::numeric * {column}"
        if isinstance(kind, sa.Integer):
            return column, f"{column}::int8 * {column}"
        return column, f"{column}::float8 * {column}"

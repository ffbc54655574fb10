"""The PostgreSQL backend: SQL built from the SQLModel tables, run on pooled psycopg 3
connections."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from types import TracebackType
from typing import Any, Generic, Self, cast

import psycopg
from psycopg.types.json import Jsonb
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from app.core.clock import utcnow
from app.core.errors import (
    DomainError,
    DuplicateKey,
    InvalidInput,
    NotFound,
    ReferenceViolation,
    StaleVersion,
    Unavailable,
)
from app.storage.mapping import (
    TableInfo,
    check_changes,
    check_column,
    decode_cursor,
    encode_cursor,
    from_row,
    json_dumps,
    json_loads,
    parse_order,
    table_info,
    to_row,
)
from app.storage.protocol import E, Op, Page, Where


def async_url(url: str) -> str:
    """Accept `postgresql://…` / `postgres://…` and select the psycopg 3 driver."""
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    raise ValueError(f"not a PostgreSQL URL: {url.split('@')[-1]}")


def make_engine(
    url: str, *, pool_size: int = 10, max_overflow: int = 10, connect_timeout: float = 5.0
) -> AsyncEngine:
    """One pooled engine per process (and per event loop), sessions in UTC."""
    return create_async_engine(
        async_url(url),
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=connect_timeout,
        pool_pre_ping=False,
        json_serializer=json_dumps,
        json_deserializer=json_loads,
        connect_args={
            "connect_timeout": max(1, int(connect_timeout)),
            "options": "-c timezone=UTC",
        },
    )


def _holds_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if hasattr(value, "obj"):  # a jsonb parameter, wrapped by psycopg
        return _holds_nul(value.obj)
    if isinstance(value, dict):
        return any(_holds_nul(k) or _holds_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_holds_nul(v) for v in value)
    return False


def _nul_param(params: Sequence[Mapping[str, Any]], info: TableInfo | None) -> str | None:
    """The column whose value holds a NUL character (which PostgreSQL text and jsonb refuse)."""
    for row in params:
        for name, value in row.items():
            if _holds_nul(value):
                if name == "_key" and info is not None:
                    return info.pk
                # Parameters are named after their column, conditions' as `status_1`.
                return name.strip("_").rstrip("0123456789").rstrip("_") or None
    return None


def _translate(
    exc: psycopg.Error, info: TableInfo | None, params: Sequence[Mapping[str, Any]] = ()
) -> DomainError:
    """Map a driver error to the domain error the memory backend raises for the same cause."""
    kind = info.kind if info is not None else "transaction"
    state = exc.sqlstate
    detail = str(exc.diag.message_detail or exc.diag.message_primary or exc)
    if state == "23505":
        return DuplicateKey(f"{kind} already exists: {detail}")
    if state == "23503":
        return ReferenceViolation(f"{kind}: {detail}")
    # psycopg refuses a NUL in a text parameter itself, before the server sees it (no sqlstate).
    if isinstance(exc, psycopg.DataError) or (state is not None and state.startswith(("22", "23"))):
        field = _nul_param(params, info)
        if field is not None:
            return InvalidInput(
                f"{field}: text cannot contain NUL (\\u0000) characters", param=field
            )
        return InvalidInput(f"{kind}: {detail}")
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        return Unavailable(f"database unavailable: {type(exc).__name__}")
    raise exc


class SqlStorage:
    """The PostgreSQL backend.

    SQLAlchemy keeps the pool (and the tables, for migrations); statements are plain SQL built
    once per table from its metadata and run on the pooled psycopg connection directly, which
    costs a third of running them through SQLAlchemy's execution layer.
    """

    name = "postgres"

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    def unit_of_work(self, *, autocommit: bool = False) -> SqlUnitOfWork:
        return SqlUnitOfWork(self.engine, autocommit=autocommit)

    async def check(self) -> None:
        async with self.unit_of_work() as uow:
            await uow._run("SELECT 1", {}, None)

    async def close(self) -> None:
        await self.engine.dispose()


class SqlUnitOfWork:
    """One database transaction on one pooled connection.

    The transaction begins at the first write: reads before it run in autocommit, which saves
    the BEGIN and ROLLBACK round trips of the many units of work that only read. Under READ
    COMMITTED every statement takes a fresh snapshot anyway, so those reads see what they
    would have seen inside the transaction. With `autocommit`, writes run that way too.
    """

    def __init__(self, engine: AsyncEngine, *, autocommit: bool = False) -> None:
        self._engine = engine
        self._autocommit = autocommit
        self._handle: AsyncConnection | None = None  # the pool's hold on the connection
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._in_transaction = False
        self._callbacks: list[Callable[[], Any]] = []
        self._failed = False
        self._done = False

    def repo(self, entity_type: type[E]) -> SqlRepository[E]:
        return SqlRepository(self, entity_type)

    def on_commit(self, callback: Callable[[], Any]) -> None:
        self._callbacks.append(callback)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._done:
            await self.rollback()

    async def rollback(self) -> None:
        self._done = True
        self._callbacks.clear()
        try:
            if self._in_transaction and self._conn is not None and not self._conn.broken:
                self._in_transaction = False
                with contextlib.suppress(psycopg.Error):
                    await self._conn.execute("ROLLBACK")
        finally:
            await self._release()

    async def commit(self) -> None:
        self._usable()
        self._done = True
        try:
            if self._in_transaction and self._conn is not None:
                try:
                    await self._conn.execute("COMMIT")
                except psycopg.Error as exc:
                    raise _translate(exc, info=None) from exc
                self._in_transaction = False
        finally:
            await self._release()
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            result = callback()
            if inspect.isawaitable(result):
                await result

    async def _release(self) -> None:
        handle, self._handle, self._conn = self._handle, None, None
        if handle is None:
            return
        if handle.sync_connection is not None and (
            (raw := handle.sync_connection.connection.dbapi_connection) is not None
            and raw.driver_connection.broken
        ):
            await handle.invalidate()  # a dead connection must not go back to the pool
        await handle.close()

    def _usable(self) -> None:
        if self._failed:
            raise RuntimeError("this unit of work failed on a constraint; roll it back")
        if self._done:
            raise RuntimeError("this unit of work is finished; open a new one")

    async def _connection(self, write: bool) -> psycopg.AsyncConnection[Any]:
        conn = self._conn
        if conn is None:
            try:
                self._handle = await self._engine.connect()
                raw = await self._handle.get_raw_connection()
            except (sa_exc.SQLAlchemyError, OSError) as exc:
                await self._release()
                raise Unavailable(f"database unreachable: {type(exc).__name__}") from exc
            conn = cast(psycopg.AsyncConnection[Any], raw.driver_connection)
            self._conn = conn
            if not conn.autocommit:
                # Transactions are begun and ended here, explicitly, only around writes.
                await conn.set_autocommit(True)
        if write and not self._autocommit and not self._in_transaction:
            await conn.execute("BEGIN")
            self._in_transaction = True
        return conn

    async def _run(
        self, query: str, params: Mapping[str, Any], info: TableInfo | None, *, write: bool = False
    ) -> psycopg.AsyncCursor[Any]:
        """Run one statement; driver errors become the domain's errors."""
        self._usable()
        try:
            conn = await self._connection(write)
            cursor = conn.cursor()
            await cursor.execute(query, params)
            return cursor
        except psycopg.Error as exc:
            self._failed = not self._autocommit  # a failed autocommit statement left nothing
            raise _translate(exc, info, [params]) from exc
        except (TypeError, ValueError) as exc:  # a JSON value the serializer refuses
            self._failed = not self._autocommit
            raise InvalidInput(f"{info.kind if info else 'query'}: {exc}") from exc

    async def _run_many(
        self, query: str, rows: Sequence[Mapping[str, Any]], info: TableInfo
    ) -> None:
        """Run one statement once per parameter set (pipelined by the driver)."""
        self._usable()
        try:
            conn = await self._connection(True)
            await conn.cursor().executemany(query, rows)
        except psycopg.Error as exc:
            self._failed = not self._autocommit
            raise _translate(exc, info, rows) from exc
        except (TypeError, ValueError) as exc:
            self._failed = not self._autocommit
            raise InvalidInput(f"{info.kind}: {exc}") from exc


# ---- statements ------------------------------------------------------------------------------


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True)
class _Table:
    """One table's statement text, built once from its metadata."""

    info: TableInfo
    names: tuple[str, ...]  # every column, in the order the statements select them
    select: str  # SELECT every column FROM the table
    get: str
    insert: str
    update: str
    returning: str

    def row(self, values: Sequence[Any]) -> dict[str, Any]:
        return dict(zip(self.names, values, strict=True))

    def params(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """Values as the driver takes them: JSON columns as jsonb (None as SQL NULL)."""
        json_columns = self.info.json_columns
        return {
            name: Jsonb(value) if name in json_columns and value is not None else value
            for name, value in row.items()
        }


@cache
def _table(info: TableInfo) -> _Table:
    names = tuple(c.name for c in info.table.columns)
    columns = ", ".join(_q(n) for n in names)
    table, pk = _q(info.name), _q(info.pk)
    settable = [n for n in names if n not in (info.pk, "created_at")]
    return _Table(
        info=info,
        names=names,
        select=f"SELECT {columns} FROM {table}",
        get=f"SELECT {columns} FROM {table} WHERE {pk} = %(_key)s",
        insert=(f"INSERT INTO {table} ({columns}) VALUES ({', '.join(f'%({n})s' for n in names)})"),
        update=(
            f"UPDATE {table} SET {', '.join(f'{_q(n)} = %({n})s' for n in settable)} "
            f"WHERE {pk} = %(_key)s AND version = %(_expected)s RETURNING {columns}"
        ),
        returning=f"RETURNING {columns}",
    )


_COMPARE = {Op.EQ: "=", Op.NE: "<>", Op.LT: "<", Op.LE: "<=", Op.GT: ">", Op.GE: ">="}


def _conditions(info: TableInfo, where: Sequence[Where], params: dict[str, Any]) -> list[str]:
    """SQL for each condition, its value added to `params` as `<column>_<n>`."""
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
        name = f"{cond.field}_{len(params) + 1}"
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
        cursor = await self._uow._run(self._sql.get, {"_key": entity_id}, self._info)
        found = await cursor.fetchone()
        return None if found is None else self._entity(found)

    async def get_many(self, ids: Sequence[Any]) -> list[E]:
        if not ids:
            return []
        query = f"{self._sql.select} WHERE {_q(self._info.pk)} = ANY(%(_keys)s)"
        cursor = await self._uow._run(query, {"_keys": list(ids)}, self._info)
        found = {e.__dict__[self._info.pk]: e for e in map(self._entity, await cursor.fetchall())}
        return [found[i] for i in ids if i in found]

    async def add(self, entity: E) -> E:
        row = to_row(entity)
        await self._uow._run(self._sql.insert, self._sql.params(row), self._info, write=True)
        return from_row(self._type, row)

    async def add_many(self, entities: Sequence[E]) -> list[E]:
        if not entities:
            return []
        rows = [to_row(e) for e in entities]
        await self._uow._run_many(self._sql.insert, [self._sql.params(r) for r in rows], self._info)
        return [from_row(self._type, r) for r in rows]

    async def update(self, entity: E) -> E:
        row = to_row(entity)
        key, expected = row.pop(self._info.pk), row.pop("version")
        row.pop("created_at")
        row.update(version=expected + 1, updated_at=utcnow())
        params = self._sql.params(row)
        params.update(_key=key, _expected=expected)
        cursor = await self._uow._run(self._sql.update, params, self._info, write=True)
        stored = await cursor.fetchone()
        if stored is None:
            exists = await self._uow._run(self._sql.get, {"_key": key}, self._info)
            if await exists.fetchone() is None:
                raise NotFound(self._info.kind, key)
            raise StaleVersion(self._info.kind, key, expected)
        return self._entity(stored)

    async def update_where(
        self, entity_id: Any, changes: Mapping[str, Any], *where: Where
    ) -> E | None:
        params = self._sql.params(check_changes(self._type, changes))
        sets = [f"{_q(name)} = %({name})s" for name in params]
        sets += ["version = version + 1", "updated_at = %(_now)s"]
        clauses = [f"{_q(self._info.pk)} = %(_key)s", *_conditions(self._info, where, params)]
        params.update(_key=entity_id, _now=utcnow())
        query = f"UPDATE {_q(self._info.name)} SET {', '.join(sets)}"
        query += f"{_where(clauses)} {self._sql.returning}"
        cursor = await self._uow._run(query, params, self._info, write=True)
        stored = await cursor.fetchone()
        return None if stored is None else self._entity(stored)

    async def delete(self, entity_id: Any) -> bool:
        query = f"DELETE FROM {_q(self._info.name)} WHERE {_q(self._info.pk)} = %(_key)s"
        cursor = await self._uow._run(query, {"_key": entity_id}, self._info, write=True)
        return bool(cursor.rowcount)

    async def delete_where(self, *where: Where) -> int:
        params: dict[str, Any] = {}
        clauses = _conditions(self._info, where, params)
        query = f"DELETE FROM {_q(self._info.name)}{_where(clauses)}"
        cursor = await self._uow._run(query, params, self._info, write=True)
        return int(cursor.rowcount)

    async def find(
        self,
        *where: Where,
        order_by: Sequence[str] = (),
        limit: int | None = None,
        after: str | None = None,
    ) -> Page[E]:
        keys = parse_order(self._info, tuple(order_by))
        paged = limit is not None or after is not None
        if paged and any(name in self._info.nullable for name, _ in keys):
            raise ValueError("cursor pagination needs sort columns that cannot be null")
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
        cursor = await self._uow._run(query, params, self._info)
        rows = [self._sql.row(r) for r in await cursor.fetchall()]
        next_cursor = None
        if limit is not None and len(rows) > limit:
            rows = rows[:limit]
            next_cursor = encode_cursor(keys, rows[-1])
        return Page(items=[from_row(self._type, r) for r in rows], next_cursor=next_cursor)

    async def count(self, *where: Where) -> int:
        params: dict[str, Any] = {}
        clauses = _conditions(self._info, where, params)
        query = f"SELECT count(*) FROM {_q(self._info.name)}{_where(clauses)}"
        cursor = await self._uow._run(query, params, self._info)
        found = await cursor.fetchone()
        return int(found[0]) if found else 0

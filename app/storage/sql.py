"""The PostgreSQL backend: SQLAlchemy Core statements over the SQLModel tables, psycopg 3."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from types import TracebackType
from typing import Any, Generic, Self, cast

import sqlalchemy as sa
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


def _nul_param(exc: sa_exc.SQLAlchemyError, info: TableInfo | None) -> str | None:
    """The column whose value holds a NUL character (which PostgreSQL text and jsonb refuse)."""
    params = getattr(exc, "params", None)
    for row in params if isinstance(params, list | tuple) else [params]:
        if not isinstance(row, dict):
            continue
        for name, value in row.items():
            if _holds_nul(value):
                if name == "_key" and info is not None:
                    return info.pk
                # Bound parameters are named after their column, e.g. `team_id_1`.
                return name.strip("_").rstrip("0123456789").rstrip("_") or None
    return None


def _translate(exc: sa_exc.SQLAlchemyError, info: TableInfo | None) -> DomainError:
    """Map a driver error to the domain error the memory backend raises for the same cause."""
    kind = info.kind if info is not None else "transaction"
    orig = getattr(exc, "orig", None)
    state = getattr(orig, "sqlstate", None)
    detail = str(getattr(getattr(orig, "diag", None), "message_detail", "") or orig or exc)
    if state == "23505":
        return DuplicateKey(f"{kind} already exists: {detail}")
    if state == "23503":
        return ReferenceViolation(f"{kind}: {detail}")
    # psycopg refuses a NUL in a text parameter itself, before the server sees it (no sqlstate).
    if isinstance(exc, sa_exc.DataError) or (state is not None and state.startswith(("22", "23"))):
        field = _nul_param(exc, info)
        if field is not None:
            return InvalidInput(
                f"{field}: text cannot contain NUL (\\u0000) characters", param=field
            )
        return InvalidInput(f"{kind}: {detail}")
    if isinstance(exc, sa_exc.StatementError) and isinstance(orig, TypeError | ValueError):
        return InvalidInput(f"{kind}: {orig}")
    if isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError | sa_exc.TimeoutError):
        return Unavailable(f"database unavailable: {type(orig or exc).__name__}")
    raise exc


class SqlStorage:
    """The PostgreSQL backend."""

    name = "postgres"

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    def unit_of_work(self) -> SqlUnitOfWork:
        return SqlUnitOfWork(self.engine)

    async def check(self) -> None:
        try:
            async with self.engine.connect() as conn:
                await conn.execute(sa.text("SELECT 1"))
        except (sa_exc.SQLAlchemyError, OSError) as exc:
            raise Unavailable(f"database unreachable: {type(exc).__name__}") from exc

    async def close(self) -> None:
        await self.engine.dispose()


class SqlUnitOfWork:
    """One database transaction on one pooled connection.

    The transaction begins at the first write: reads before it run in autocommit, which saves
    the BEGIN and ROLLBACK round trips of the many units of work that only read. Under READ
    COMMITTED every statement takes a fresh snapshot anyway, so those reads see what they
    would have seen inside the transaction.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._conn: AsyncConnection | None = None
        self._reading = False  # the connection is in autocommit: no write has happened yet
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
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.rollback()
            finally:
                await conn.close()

    async def commit(self) -> None:
        self._usable()
        conn, self._conn = self._conn, None
        self._done = True
        if conn is not None:
            try:
                await conn.commit()
            except sa_exc.SQLAlchemyError as exc:
                raise _translate(exc, info=None) from exc
            finally:
                await conn.close()
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            result = callback()
            if inspect.isawaitable(result):
                await result

    def _usable(self) -> None:
        if self._failed:
            raise RuntimeError("this unit of work failed on a constraint; roll it back")
        if self._done:
            raise RuntimeError("this unit of work is finished; open a new one")

    async def _execute(
        self, statement: Any, info: TableInfo, params: dict[str, Any] | None = None
    ) -> sa.CursorResult[Any]:
        self._usable()
        try:
            read = isinstance(statement, sa.Select)
            if self._conn is None:
                self._conn = await self._engine.connect()
                if read:
                    await self._conn.execution_options(isolation_level="AUTOCOMMIT")
                    self._reading = True
            elif self._reading and not read:
                await self._conn.commit()  # ends nothing on the server: no transaction is open
                await self._conn.execution_options(isolation_level=self._write_isolation())
                self._reading = False
            return cast(sa.CursorResult[Any], await self._conn.execute(statement, params))
        except sa_exc.SQLAlchemyError as exc:
            self._failed = True
            raise _translate(exc, info) from exc
        except (TypeError, ValueError) as exc:  # a JSON value the serializer refuses
            self._failed = True
            raise InvalidInput(f"{info.kind}: {exc}") from exc
        except OSError as exc:
            self._failed = True
            raise Unavailable(f"database unreachable: {exc}") from exc

    def _write_isolation(self) -> str:
        return str(self._engine.dialect.default_isolation_level or "READ COMMITTED")


def _condition(info: TableInfo, cond: Where) -> Any:
    check_column(info, cond.field)
    if cond.field in info.json_columns and cond.op is not Op.IS_NULL:
        raise ValueError(f"cannot filter {info.kind} on JSON column {cond.field!r}")
    col = info.table.c[cond.field]
    value = getattr(cond.value, "value", cond.value)
    if cond.op is Op.EQ:
        return col == value
    if cond.op is Op.NE:
        return col != value
    if cond.op is Op.LT:
        return col < value
    if cond.op is Op.LE:
        return col <= value
    if cond.op is Op.GT:
        return col > value
    if cond.op is Op.GE:
        return col >= value
    if cond.op is Op.IN:
        return col.in_([getattr(v, "value", v) for v in cond.value])
    return col.is_(None) if cond.value else col.is_not(None)


def _after(info: TableInfo, keys: list[tuple[str, bool]], values: list[Any]) -> Any:
    """Rows strictly after `values` in the order `keys` (keyset pagination)."""
    alternatives = []
    for i, (name, desc) in enumerate(keys):
        col = info.table.c[name]
        equal = [info.table.c[n] == v for (n, _), v in zip(keys[:i], values[:i], strict=True)]
        step = col < values[i] if desc else col > values[i]
        alternatives.append(sa.and_(*equal, step))
    return sa.or_(*alternatives)


@dataclass(frozen=True)
class _Statements:
    """One table's most used statements, built once with bound parameters.

    Building a statement with its values inlined costs more CPU than the round trip it makes;
    a prebuilt one is compiled once and reused from SQLAlchemy's cache.
    """

    get: Any
    insert: Any
    update: Any


@cache
def _statements(info: TableInfo) -> _Statements:
    table, pk = info.table, info.table.c[info.pk]
    return _Statements(
        get=sa.select(table).where(pk == sa.bindparam("_key")),
        insert=sa.insert(table),
        # Without .values(): the SET clause comes from the column names among the parameters.
        update=sa.update(table)
        .where(pk == sa.bindparam("_key"), table.c.version == sa.bindparam("_expected"))
        .returning(table),
    )


class SqlRepository(Generic[E]):
    """The generic repository over one entity type in a `SqlUnitOfWork`."""

    def __init__(self, uow: SqlUnitOfWork, entity_type: type[E]) -> None:
        self._uow = uow
        self._type = entity_type
        self._info = table_info(entity_type)
        self._table = self._info.table
        self._pk = self._table.c[self._info.pk]
        self._statements = _statements(self._info)

    async def get(self, entity_id: Any) -> E | None:
        result = await self._uow._execute(self._statements.get, self._info, {"_key": entity_id})
        row = result.mappings().first()
        return None if row is None else from_row(self._type, row)

    async def get_many(self, ids: Sequence[Any]) -> list[E]:
        if not ids:
            return []
        result = await self._uow._execute(
            sa.select(self._table).where(self._pk.in_(list(ids))), self._info
        )
        found = {r[self._info.pk]: r for r in result.mappings()}
        return [from_row(self._type, found[i]) for i in ids if i in found]

    async def add(self, entity: E) -> E:
        row = to_row(entity)
        await self._uow._execute(self._statements.insert, self._info, row)
        return from_row(self._type, row)

    async def update(self, entity: E) -> E:
        row = to_row(entity)
        key, expected = row.pop(self._info.pk), row.pop("version")
        row.pop("created_at")
        row.update(version=expected + 1, updated_at=utcnow(), _key=key, _expected=expected)
        result = await self._uow._execute(self._statements.update, self._info, row)
        stored = result.mappings().first()
        if stored is None:
            exists = await self._uow._execute(
                sa.select(self._pk).where(self._pk == key), self._info
            )
            if exists.first() is None:
                raise NotFound(self._info.kind, key)
            raise StaleVersion(self._info.kind, key, expected)
        return from_row(self._type, stored)

    async def delete(self, entity_id: Any) -> bool:
        result = await self._uow._execute(
            sa.delete(self._table).where(self._pk == entity_id), self._info
        )
        return bool(result.rowcount)

    async def delete_where(self, *where: Where) -> int:
        conds = [_condition(self._info, c) for c in where]
        result = await self._uow._execute(sa.delete(self._table).where(*conds), self._info)
        return int(result.rowcount)

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
        statement = sa.select(self._table).where(*(_condition(self._info, c) for c in where))
        if after is not None:
            statement = statement.where(_after(self._info, keys, decode_cursor(keys, after)))
        statement = statement.order_by(
            *(self._table.c[n].desc() if d else self._table.c[n].asc() for n, d in keys)
        )
        if limit is not None:
            statement = statement.limit(limit + 1)
        rows = [dict(r) for r in (await self._uow._execute(statement, self._info)).mappings()]
        next_cursor = None
        if limit is not None and len(rows) > limit:
            rows = rows[:limit]
            next_cursor = encode_cursor(keys, rows[-1])
        return Page(items=[from_row(self._type, r) for r in rows], next_cursor=next_cursor)

    async def count(self, *where: Where) -> int:
        statement = sa.select(sa.func.count()).select_from(self._table)
        statement = statement.where(*(_condition(self._info, c) for c in where))
        result = await self._uow._execute(statement, self._info)
        return int(result.scalar_one())

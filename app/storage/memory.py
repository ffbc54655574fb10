"""The memory backend: committed rows in dicts under a lock, writes staged per unit of work."""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic

from app.core.clock import utcnow
from app.core.errors import (
    DuplicateKey,
    InvalidInput,
    NotFound,
    ReferenceViolation,
    StaleVersion,
)
from app.storage.entity import Entity
from app.storage.mapping import (
    TableInfo,
    check_changes,
    check_column,
    decode_cursor,
    encode_cursor,
    entity_for_table,
    find_order,
    from_row,
    json_dumps,
    json_loads,
    numeric_column,
    quantile,
    referencing,
    table_info,
    to_row,
)
from app.storage.protocol import E, Moments, Op, Page, Summary, Tally, Where, apply_change
from app.storage.unit import UnitOfWorkBase

Row = dict[str, Any]


@dataclass
class _Table:
    """The committed rows of one table and the indexes kept over them."""

    info: TableInfo
    rows: dict[Any, Row] = field(default_factory=dict)
    # (columns) -> (values) -> primary keys; covers unique keys, references and declared indexes.
    indexes: dict[tuple[str, ...], dict[tuple[Any, ...], set[Any]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        keys = set(self.info.unique[1:])
        keys |= {(fk.column,) for fk in self.info.references}
        keys |= {tuple(c.name for c in ix.columns) for ix in self.info.table.indexes}
        self.indexes = {cols: {} for cols in keys}

    def put(self, key: Any, row: Row | None) -> None:
        # Replace in place rather than pop and re-insert: readers outside the lock must never
        # see a committed row missing for an instant.
        old = self.rows.get(key)
        for cols, index in self.indexes.items():
            if old is not None:
                bucket = index.get(tuple(old[c] for c in cols))
                if bucket is not None:
                    bucket.discard(key)
                    if not bucket:
                        del index[tuple(old[c] for c in cols)]
            if row is not None:
                index.setdefault(tuple(row[c] for c in cols), set()).add(key)
        if row is not None:
            self.rows[key] = row
        elif old is not None:
            del self.rows[key]

    def lookup(self, cols: tuple[str, ...], values: tuple[Any, ...]) -> set[Any]:
        index = self.indexes.get(cols)
        if index is not None:
            return set(index.get(values, ()))
        return {k for k, r in self.rows.items() if tuple(r[c] for c in cols) == values}


class MemoryStore:
    """Every table's committed rows, shared by all units of work of one process."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._tables: dict[str, _Table] = {}
        # The commit stamp the next commit writes on the rows it inserts (`commit_stamp()`).
        self.next_stamp = 1

    def table(self, info: TableInfo) -> _Table:
        table = self._tables.get(info.name)
        if table is None:
            with self.lock:
                table = self._tables.setdefault(info.name, _Table(info))
        return table

    def clear(self) -> None:
        with self.lock:
            self._tables.clear()


class MemoryStorage:
    """The memory backend: valid only when API and worker share one process."""

    name = "memory"

    def __init__(self, store: MemoryStore | None = None) -> None:
        self.store = store or MemoryStore()

    def unit_of_work(self, *, autocommit: bool = False, durable: bool = True) -> MemoryUnitOfWork:
        # Nothing here outlives the process: every commit is as durable as any other.
        return MemoryUnitOfWork(self.store, autocommit=autocommit)

    async def check(self) -> None:
        return None

    async def close(self) -> None:
        return None


def _comparable(stored: Any, given: Any) -> Any:
    """A naive datetime compared with a stored aware one is read as UTC, as PostgreSQL reads it
    (its sessions run with `timezone=UTC`), instead of failing the comparison."""
    if (
        isinstance(given, datetime)
        and given.tzinfo is None
        and isinstance(stored, datetime)
        and stored.tzinfo is not None
    ):
        return given.replace(tzinfo=UTC)
    return given


def _matches(row: Row, where: Sequence[Where]) -> bool:
    for cond in where:
        value = row[cond.field]
        if cond.op is Op.IS_NULL:
            if (value is None) != bool(cond.value):
                return False
            continue
        if cond.op is Op.IN:
            if value is None or value not in cond.value:
                return False
            continue
        if value is None or cond.value is None:
            return False
        expected = _comparable(value, cond.value)
        if cond.op is Op.EQ:
            ok = value == expected
        elif cond.op is Op.NE:
            ok = value != expected
        elif cond.op is Op.LT:
            ok = value < expected
        elif cond.op is Op.LE:
            ok = value <= expected
        elif cond.op is Op.GT:
            ok = value > expected
        else:
            ok = value >= expected
        if not ok:
            return False
    return True


class _Desc:
    """Reverses the comparison of the value it wraps (for descending sort keys)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __lt__(self, other: _Desc) -> bool:
        return bool(other.value < self.value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Desc) and self.value == other.value

    __hash__ = None  # type: ignore[assignment]


def _sort_key(keys: list[tuple[str, bool]]) -> Callable[[Row], tuple[Any, ...]]:
    # PostgreSQL puts NULLs last ascending and first descending: None is the greatest value.
    def key(row: Row) -> tuple[Any, ...]:
        parts: list[Any] = []
        for name, desc in keys:
            value = row[name]
            part = (value is None, 0 if value is None else value)
            parts.append(_Desc(part) if desc else part)
        return tuple(parts)

    return key


def _normalise(where: Sequence[Where], info: TableInfo) -> list[Where]:
    plain: list[Where] = []
    for cond in where:
        check_column(info, cond.field)
        if cond.field in info.json_columns and cond.op is not Op.IS_NULL:
            raise ValueError(f"cannot filter {info.kind} on JSON column {cond.field!r}")
        value = cond.value
        if cond.op is Op.IN:
            value = tuple(getattr(v, "value", v) for v in value)
        elif cond.op is not Op.IS_NULL:
            value = getattr(value, "value", value)
        plain.append(Where(cond.field, cond.op, value))
    return plain


class _Autocommit:
    """The store's lock over one write and its immediate commit (or its discarding)."""

    def __init__(self, uow: MemoryUnitOfWork) -> None:
        self._uow = uow

    def __enter__(self) -> None:
        self._uow._store.lock.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, *rest: Any) -> None:
        try:
            if exc_type is None:
                self._uow._apply()
            else:
                self._uow._staged.clear()
                self._uow._staged_keys.clear()
                self._uow._based_on.clear()
                self._uow._failed = False  # nothing of it was kept: the unit stays usable
        finally:
            self._uow._store.lock.release()


class MemoryUnitOfWork(UnitOfWorkBase):
    """A transaction over a `MemoryStore`: reads see committed rows plus this unit's writes."""

    def __init__(self, store: MemoryStore, *, autocommit: bool = False) -> None:
        super().__init__(autocommit=autocommit)
        self._store = store
        # table -> key -> staged row (None means deleted)
        self._staged: dict[str, dict[Any, Row | None]] = {}
        # (table, unique columns) -> values -> keys of the staged rows holding them, so a
        # unique check does not scan every row this unit staged.
        self._staged_keys: dict[tuple[str, tuple[str, ...]], dict[tuple[Any, ...], set[Any]]] = {}
        # (table, key) -> committed version this unit's write was based on (None = absent)
        self._based_on: dict[tuple[str, Any], int | None] = {}

    def repo(self, entity_type: type[E]) -> MemoryRepository[E]:
        return MemoryRepository(self, entity_type)

    async def rollback(self) -> None:
        self._staged.clear()
        self._staged_keys.clear()
        self._based_on.clear()
        self._callbacks.clear()
        self._done = True

    async def commit(self) -> None:
        self._usable()
        self._apply()
        self._done = True
        await self._run_callbacks()

    def _apply(self) -> None:
        """Validate the staged writes against what is committed now and make them visible."""
        with self._store.lock:
            self._validate_commit()
            stamp = self._store.next_stamp
            self._store.next_stamp += 1
            for name, staged in self._staged.items():
                info = table_info(entity_for_table(name))
                table = self._store.table(info)
                for key, row in staged.items():
                    if row is not None and info.stamp is not None:
                        current = table.rows.get(key)
                        row[info.stamp] = stamp if current is None else current[info.stamp]
                    table.put(key, row)
        self._staged.clear()
        self._staged_keys.clear()
        self._based_on.clear()

    async def commit_horizon(self) -> int:
        self._usable()
        with self._store.lock:
            return self._store.next_stamp

    # ---- internals used by the repositories ----------------------------------------------

    def _write(self) -> Any:
        """Hold around a repository write: in autocommit, the write and its commit are atomic."""
        return _Autocommit(self) if self._autocommit else contextlib.nullcontext()

    def _fail(self, error: Exception) -> Exception:
        self._failed = True
        return error

    def _committed(self, info: TableInfo) -> _Table:
        return self._store.table(info)

    def _current(self, info: TableInfo, key: Any) -> Row | None:
        staged = self._staged.get(info.name, {})
        if key in staged:
            return staged[key]
        return self._committed(info).rows.get(key)

    def _stage(self, info: TableInfo, key: Any, row: Row | None, seen: Row | None) -> None:
        """Stage `row` (None: deleted), decided on `seen`; commit refuses if `seen` went stale."""
        staged = self._staged.setdefault(info.name, {})
        if (info.name, key) not in self._based_on:
            # The version the decision was made on, not the one committed now: another unit
            # may have committed in between, and its write must not be silently overwritten.
            self._based_on[(info.name, key)] = None if seen is None else seen["version"]
        before = staged.get(key)
        for cols in info.unique[1:]:
            index = self._staged_keys.setdefault((info.name, cols), {})
            if before is not None:
                index.get(tuple(before[c] for c in cols), set()).discard(key)
            if row is not None:
                index.setdefault(tuple(row[c] for c in cols), set()).add(key)
        staged[key] = row

    def _rows(self, info: TableInfo, where: Sequence[Where]) -> Iterator[Row]:
        """Every visible row matching `where` (committed rows narrowed by an index if one fits)."""
        table = self._committed(info)
        staged = self._staged.get(info.name, {})
        with self._store.lock:
            keys: Iterable[Any] | None = None
            for cond in where:
                if cond.op is Op.EQ and (cond.field,) in table.indexes:
                    keys = table.lookup((cond.field,), (cond.value,))
                    break
                if cond.field == info.pk and cond.op is Op.EQ:
                    keys = [cond.value]
                    break
            if keys is None:
                committed = list(table.rows.values())
            else:
                committed = [table.rows[k] for k in keys if k in table.rows]
        for row in committed:
            if row[info.pk] not in staged and _matches(row, where):
                yield row
        for mine in staged.values():
            if mine is not None and _matches(mine, where):
                yield mine

    def _check_unique(self, info: TableInfo, row: Row) -> None:
        table = self._committed(info)
        staged = self._staged.get(info.name, {})
        key = row[info.pk]
        for cols in info.unique:
            values = tuple(row[c] for c in cols)
            if any(v is None for v in values):
                continue
            if cols == (info.pk,):
                continue  # a taken primary key is found by whoever stages the row
            with self._store.lock:
                holders = table.lookup(cols, values)
            holders = {h for h in holders if h not in staged}
            holders |= self._staged_keys.get((info.name, cols), {}).get(values, set())
            holders.discard(key)
            if holders:
                shown = ", ".join(f"{c}={v!r}" for c, v in zip(cols, values, strict=True))
                raise self._fail(DuplicateKey(f"{info.kind} with {shown} already exists"))

    def _check_references(self, info: TableInfo, row: Row) -> None:
        for fk in info.references:
            value = row[fk.column]
            if value is None:
                continue
            target = table_info(entity_for_table(fk.target_table))
            if self._current(target, value) is None:
                raise self._fail(
                    ReferenceViolation(
                        f"{info.kind}.{fk.column} refers to {target.kind} '{value}', "
                        "which does not exist",
                        param=fk.column,
                    )
                )

    def _delete(self, info: TableInfo, key: Any) -> bool:
        row = self._current(info, key)
        if row is None:
            return False
        self._stage(info, key, None, row)
        for fk in referencing(info.name):
            child = table_info(entity_for_table(fk.table))
            for child_row in list(self._rows(child, [Where.eq(fk.column, key)])):
                child_key = child_row[child.pk]
                if fk.on_delete == "CASCADE":
                    self._delete(child, child_key)
                elif fk.on_delete == "SET NULL":
                    self._stage(child, child_key, {**child_row, fk.column: None}, child_row)
                else:
                    raise self._fail(
                        ReferenceViolation(
                            f"{info.kind} '{key}' is still used by {child.kind} '{child_key}'"
                        )
                    )
        return True

    def _validate_commit(self) -> None:
        """Re-check versions, unique keys and references against rows committed meanwhile."""
        for (name, key), based_on in self._based_on.items():
            info = table_info(entity_for_table(name))
            committed = self._committed(info).rows.get(key)
            now = None if committed is None else committed["version"]
            if now != based_on:
                if based_on is None:
                    raise self._fail(DuplicateKey(f"{info.kind} '{key}' already exists"))
                raise self._fail(StaleVersion(info.kind, key, based_on))
        for name, staged in self._staged.items():
            info = table_info(entity_for_table(name))
            for row in staged.values():
                if row is not None:
                    self._check_unique(info, row)
                    self._check_references(info, row)
            deleted = [k for k, r in staged.items() if r is None]
            for fk in referencing(name) if deleted else ():
                child = table_info(entity_for_table(fk.table))
                for key in deleted:
                    if any(True for _ in self._rows(child, [Where.eq(fk.column, key)])):
                        raise self._fail(
                            ReferenceViolation(f"{info.kind} '{key}' gained a reference meanwhile")
                        )


class MemoryRepository(Generic[E]):
    """The generic repository over one entity type in a `MemoryUnitOfWork`."""

    def __init__(self, uow: MemoryUnitOfWork, entity_type: type[E]) -> None:
        self._uow = uow
        self._type = entity_type
        self._info = table_info(entity_type)

    def _load(self, row: Row) -> E:
        values = dict(row)
        for name in self._info.json_columns:
            if values[name] is not None:
                values[name] = json_loads(values[name])
        return from_row(self._type, values)

    def _dump(self, entity: Entity) -> Row:
        row = to_row(entity)
        for name in self._info.json_columns:
            if row[name] is not None:
                try:
                    row[name] = json_dumps(row[name])
                except TypeError as exc:
                    raise InvalidInput(
                        f"{self._info.kind}.{name} is not JSON-serialisable: {exc}", param=name
                    ) from exc
        return row

    async def get(self, entity_id: Any) -> E | None:
        self._uow._usable()
        row = self._uow._current(self._info, entity_id)
        return None if row is None else self._load(row)

    async def get_many(self, ids: Sequence[Any]) -> list[E]:
        self._uow._usable()
        rows = (self._uow._current(self._info, i) for i in ids)
        return [self._load(r) for r in rows if r is not None]

    async def add(self, entity: E) -> E:
        self._uow._usable()
        row = self._dump(entity)
        with self._uow._write():
            return self._load(self._stage_new(row))

    def _stage_new(self, row: Row) -> Row:
        key = row[self._info.pk]
        if self._uow._current(self._info, key) is not None:
            raise self._uow._fail(DuplicateKey(f"{self._info.kind} '{key}' already exists"))
        self._uow._check_unique(self._info, row)
        self._uow._check_references(self._info, row)
        self._uow._stage(self._info, key, row, None)
        return row

    async def add_many(self, entities: Sequence[E]) -> int:
        self._uow._usable()
        rows = [self._dump(entity) for entity in entities]  # an invalid one stages none
        with self._uow._write():  # in autocommit, all of them commit together or none does
            for row in rows:
                self._stage_new(row)
        return len(rows)

    async def add_missing(self, entities: Sequence[E]) -> list[Any]:
        self._uow._usable()
        rows = [self._dump(entity) for entity in entities]
        pk = self._info.pk
        added: list[Any] = []
        with self._uow._write():
            for row in rows:
                if self._uow._current(self._info, row[pk]) is None:
                    added.append(self._stage_new(row)[pk])
        return added

    async def update(self, entity: E) -> E:
        self._uow._usable()
        row = self._dump(entity)
        key = row[self._info.pk]
        with self._uow._write():
            current = self._uow._current(self._info, key)
            if current is None:
                raise NotFound(self._info.kind, key)
            if current["version"] != row["version"]:
                raise StaleVersion(self._info.kind, key, row["version"])
            self._rewrite(key, row, current)
        return self._load(row)

    async def update_where(
        self, entity_id: Any, changes: Mapping[str, Any], *where: Where
    ) -> E | None:
        row = self._write_where(entity_id, changes, where)
        return None if row is None else self._load(row)

    async def write_where(self, entity_id: Any, changes: Mapping[str, Any], *where: Where) -> bool:
        return self._write_where(entity_id, changes, where) is not None

    async def write_where_adding(
        self,
        entity_id: Any,
        changes: Mapping[str, Any],
        *where: Where,
        adding: Sequence[Entity],
    ) -> list[Any] | None:
        repos = [MemoryRepository(self._uow, type(entity)) for entity in adding]
        rows = [repo._dump(entity) for repo, entity in zip(repos, adding, strict=True)]
        added: list[Any] = []

        def add() -> None:
            for repo, row in zip(repos, rows, strict=True):
                key = row[repo._info.pk]
                if self._uow._current(repo._info, key) is None:
                    added.append(repo._stage_new(row)[repo._info.pk])

        if self._write_where(entity_id, changes, where, then=add) is None:
            return None
        return added

    def _write_where(
        self,
        entity_id: Any,
        changes: Mapping[str, Any],
        where: Sequence[Where],
        then: Callable[[], None] | None = None,
    ) -> Row | None:
        self._uow._usable()
        conds = _normalise(where, self._info)
        checked = check_changes(self._type, changes)  # refused whether or not a row matches
        with self._uow._write():  # in autocommit, `then`'s writes commit with this one or none
            current = self._uow._current(self._info, entity_id)
            if current is None or not _matches(current, conds):
                return None
            entity = self._load(current)
            for name, change in checked.items():
                setattr(entity, name, apply_change(getattr(entity, name), change))
            row = self._dump(entity)
            self._rewrite(entity_id, row, current)
            if then is not None:
                then()
        return row

    async def update_all(self, changes: Mapping[str, Any], *where: Where) -> int:
        self._uow._usable()
        conds = _normalise(where, self._info)
        checked = check_changes(self._type, changes)
        pk = self._info.pk
        with self._uow._write():
            rows = list(self._uow._rows(self._info, conds))
            for current in rows:
                entity = self._load(current)
                for name, change in checked.items():
                    setattr(entity, name, apply_change(getattr(entity, name), change))
                self._rewrite(current[pk], self._dump(entity), current)
        return len(rows)

    def _rewrite(self, key: Any, row: Row, current: Row) -> None:
        row["version"] = current["version"] + 1
        row["updated_at"] = utcnow()
        row["created_at"] = current["created_at"]
        if self._info.stamp is not None:
            row[self._info.stamp] = current[self._info.stamp]
        self._uow._check_unique(self._info, row)
        self._uow._check_references(self._info, row)
        self._uow._stage(self._info, key, row, current)

    async def delete(self, entity_id: Any) -> bool:
        self._uow._usable()
        with self._uow._write():
            return self._uow._delete(self._info, entity_id)

    async def delete_where(self, *where: Where) -> int:
        self._uow._usable()
        conds = _normalise(where, self._info)
        with self._uow._write():
            keys = [row[self._info.pk] for row in self._uow._rows(self._info, conds)]
            return sum(1 for key in keys if self._uow._delete(self._info, key))

    async def find(
        self,
        *where: Where,
        order_by: Sequence[str] = (),
        limit: int | None = None,
        after: str | None = None,
    ) -> Page[E]:
        self._uow._usable()
        conds = _normalise(where, self._info)
        keys = find_order(self._info, order_by, limit, after, where)
        rows = sorted(self._uow._rows(self._info, conds), key=_sort_key(keys))
        if after is not None:
            start = _sort_key(keys)(
                {n: v for (n, _), v in zip(keys, decode_cursor(keys, after), strict=True)}
            )
            sort = _sort_key(keys)
            rows = [r for r in rows if start < sort(r)]
        next_cursor = None
        if limit is not None and len(rows) > limit:
            rows = rows[:limit]
            next_cursor = encode_cursor(keys, rows[-1])
        return Page(items=[self._load(r) for r in rows], next_cursor=next_cursor)

    async def count(self, *where: Where) -> int:
        self._uow._usable()
        conds = _normalise(where, self._info)
        return sum(1 for _ in self._uow._rows(self._info, conds))

    async def count_by(
        self, field: str, *where: Where, least: str | None = None
    ) -> dict[Any, Tally]:
        self._uow._usable()
        check_column(self._info, field)
        if least is not None:
            check_column(self._info, least)
        conds = _normalise(where, self._info)
        groups: dict[Any, Tally] = {}
        for row in self._uow._rows(self._info, conds):
            key = row[field]
            value = row[least] if least is not None else None
            seen = groups.get(key)
            if seen is None:
                groups[key] = Tally(1, value)
                continue
            lowest = seen.least
            if value is not None and (lowest is None or value < lowest):
                lowest = value
            groups[key] = Tally(seen.count + 1, lowest)
        return groups

    async def summarize(
        self,
        group_by: str,
        columns: Sequence[str],
        *where: Where,
        quantiles: Mapping[str, Sequence[float]] | None = None,
        distinct: Sequence[str] = (),
    ) -> dict[Any, Summary]:
        self._uow._usable()
        check_column(self._info, group_by)
        for name in distinct:
            check_column(self._info, name)
        kinds = {name: numeric_column(self._info, name) for name in columns}
        wanted = dict(quantiles or {})
        for name in wanted:
            numeric_column(self._info, name)
        conds = _normalise(where, self._info)
        groups: dict[Any, list[Row]] = {}
        for row in self._uow._rows(self._info, conds):
            groups.setdefault(row[group_by], []).append(row)
        return {
            key: Summary(
                count=len(rows),
                moments={name: _moments(rows, name, kind) for name, kind in kinds.items()},
                quantiles={
                    name: [quantile(ordered, q) for q in fractions]
                    for name, fractions in wanted.items()
                    for ordered in [sorted(r[name] for r in rows if r[name] is not None)]
                },
                distinct={
                    name: len({r[name] for r in rows if r[name] is not None}) for name in distinct
                },
            )
            for key, rows in groups.items()
        }


def _moments(rows: Sequence[Row], name: str, kind: type[int] | type[float]) -> Moments:
    values = [kind(r[name]) for r in rows if r[name] is not None]
    if not values:
        return Moments()
    if kind is int:
        return Moments(
            len(values), sum(values), sum(v * v for v in values), min(values), max(values)
        )
    return Moments(
        len(values),
        math.fsum(values),
        math.fsum(v * v for v in values),
        min(values),
        max(values),
    )

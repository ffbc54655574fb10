"""The storage protocol in domain terms: repositories over entities, and a unit of work."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from types import TracebackType
from typing import Any, Generic, Protocol, Self, TypeVar

from app.storage.entity import Entity

E = TypeVar("E", bound=Entity)


class Op(StrEnum):
    """Comparison operators a condition can use."""

    EQ = "eq"
    NE = "ne"
    LT = "lt"
    LE = "le"
    GT = "gt"
    GE = "ge"
    IN = "in"
    IS_NULL = "is_null"


def given(*conditions: Where) -> list[Where]:
    """The conditions whose value was given: a list endpoint's optional filters, None = any."""
    return [c for c in conditions if c.value is not None]


@dataclass(frozen=True, slots=True)
class Where:
    """One condition on a column: `Where("status", Op.EQ, "pending")`."""

    field: str
    op: Op
    value: Any = None

    @classmethod
    def eq(cls, field: str, value: Any) -> Where:
        return cls(field, Op.EQ, value)

    @classmethod
    def ne(cls, field: str, value: Any) -> Where:
        return cls(field, Op.NE, value)

    @classmethod
    def lt(cls, field: str, value: Any) -> Where:
        return cls(field, Op.LT, value)

    @classmethod
    def le(cls, field: str, value: Any) -> Where:
        return cls(field, Op.LE, value)

    @classmethod
    def gt(cls, field: str, value: Any) -> Where:
        return cls(field, Op.GT, value)

    @classmethod
    def ge(cls, field: str, value: Any) -> Where:
        return cls(field, Op.GE, value)

    @classmethod
    def in_(cls, field: str, values: Sequence[Any]) -> Where:
        return cls(field, Op.IN, tuple(values))

    @classmethod
    def is_null(cls, field: str, null: bool = True) -> Where:
        return cls(field, Op.IS_NULL, null)


@dataclass(frozen=True, slots=True)
class Page(Generic[E]):
    """One page of a `find`: the items, and the cursor of the next page (None on the last)."""

    items: list[E] = field(default_factory=list)
    next_cursor: str | None = None


@dataclass(frozen=True, slots=True)
class Tally:
    """One group of a `count_by`: how many entities share the value, and the least value of
    the field asked for among them (None when not asked, or when all of them are null)."""

    count: int
    least: Any = None


@dataclass(frozen=True, slots=True)
class Moments:
    """The non-null values of one numeric (or boolean: true is 1) column in a group of
    `summarize`: how many, their sum and sum of squares, least and greatest.

    Sums of integer and boolean columns are exact integers; of float columns, floats.
    """

    n: int = 0
    total: int | float = 0
    squares: int | float = 0
    least: int | float | None = None
    most: int | float | None = None


@dataclass(frozen=True, slots=True)
class Summary:
    """One group of a `summarize`: its row count, the `Moments` of each column asked, the
    quantiles asked of a column (linearly interpolated between the closest ranks, as
    PostgreSQL's `percentile_cont` and numpy's default; None where the column has no value),
    and how many distinct non-null values a column asked holds."""

    count: int
    moments: dict[str, Moments]
    quantiles: dict[str, list[float | None]] = field(default_factory=dict)
    distinct: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Increment:
    """A change of `update_where`: add `by` to an integer column's value (null counts as 0)."""

    by: int = 1


@dataclass(frozen=True, slots=True)
class Append:
    """A change of `update_where`: append `items` to a JSON list column (null counts as [])."""

    items: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class IfNull:
    """A change of `update_where`: set the column to `value` only where it is null."""

    value: Any


Change = Increment | Append | IfNull


def apply_change(current: Any, change: Any) -> Any:
    """What a column holding `current` holds after `change` (a plain value replaces it)."""
    if isinstance(change, Increment):
        return (current or 0) + change.by
    if isinstance(change, Append):
        return [*(current or ()), *change.items]
    if isinstance(change, IfNull):
        return change.value if current is None else current
    return change


class Repository(Protocol[E]):
    """Reads and writes of one entity type inside a unit of work; it never commits."""

    async def get(self, entity_id: Any) -> E | None:
        """The entity with this primary key, or None."""
        ...

    async def get_many(self, ids: Sequence[Any]) -> list[E]:
        """The entities with these primary keys that exist, in the order asked."""
        ...

    async def add(self, entity: E) -> E:
        """Insert a new entity; a taken unique key raises `DuplicateKey`."""
        ...

    async def add_many(self, entities: Sequence[E]) -> int:
        """Insert new entities, all or (on a taken key) none of them, in one go; how many.

        Unlike `add`, nothing is read back: the caller keeps what it gave, and a later change
        to it changes nothing stored.
        """
        ...

    async def add_missing(self, entities: Sequence[E]) -> list[Any]:
        """Insert those of `entities` whose primary key is not taken, in one go; the keys of
        the ones inserted, in the order given.

        An entity whose key exists is skipped without being compared, so writing the same rows
        again (a retried batch, a job run twice) changes nothing: the keys returned say which
        rows are new, and so what else to do once per row (charge a budget, say).
        """
        ...

    async def update(self, entity: E) -> E:
        """Write `entity` if its version is current, returning it with the next version.

        A stale version raises `StaleVersion`, a missing row `NotFound`.
        """
        ...

    async def update_where(
        self, entity_id: Any, changes: Mapping[str, Any], *where: Where
    ) -> E | None:
        """Set `changes` on the entity if it matches every condition, in one step; the entity
        as written, or None when it is missing or does not match.

        No read comes first and no version is compared: the conditions are the check (a job's
        lease token, say), so this is a compare-and-set the database does in one statement.
        A change may be a value or an `Increment`, `Append` or `IfNull` of the current one.
        """
        ...

    async def write_where(self, entity_id: Any, changes: Mapping[str, Any], *where: Where) -> bool:
        """`update_where` for a caller that needs only to know whether the write applied: the
        row written is not read back."""
        ...

    async def update_all(self, changes: Mapping[str, Any], *where: Where) -> int:
        """Set `changes` on every entity matching all conditions, in one statement; how many.

        Each row written gets its next version, so a unit that read one before cannot commit
        a stale change to it.
        """
        ...

    async def write_where_adding(
        self,
        entity_id: Any,
        changes: Mapping[str, Any],
        *where: Where,
        adding: Sequence[Entity],
    ) -> list[Any] | None:
        """`write_where`, and, only if it applied, `add_missing` of `adding` (entities of any
        types), as one step (one statement on PostgreSQL): the keys of the entities inserted,
        in the order given, or None when the write did not apply and nothing was added.

        A job's outcome and the rows that are part of it (its usage) commit this way in one
        round trip: neither is ever written without the other.
        """
        ...

    async def delete(self, entity_id: Any) -> bool:
        """Remove the entity (and what cascades from it); False when it did not exist."""
        ...

    async def delete_where(self, *where: Where) -> int:
        """Remove every entity matching all conditions; returns how many."""
        ...

    async def find(
        self,
        *where: Where,
        order_by: Sequence[str] = (),
        limit: int | None = None,
        after: str | None = None,
    ) -> Page[E]:
        """Entities matching all conditions, ordered (`-field` for descending, primary key last).

        With `limit`, the page carries a cursor; passing it back as `after` continues after the
        last item seen, with no gaps or repeats even when rows are inserted meanwhile.
        """
        ...

    async def count(self, *where: Where) -> int:
        """How many entities match all conditions."""
        ...

    async def count_by(
        self, field: str, *where: Where, least: str | None = None
    ) -> dict[Any, Tally]:
        """The entities matching all conditions, counted per value of `field` (one grouped
        query), with the least value of `least` in each group; values with no match are absent.
        """
        ...

    async def summarize(
        self,
        group_by: str,
        columns: Sequence[str],
        *where: Where,
        quantiles: Mapping[str, Sequence[float]] | None = None,
        distinct: Sequence[str] = (),
    ) -> dict[Any, Summary]:
        """Aggregates of the entities matching all conditions, per value of `group_by`, in one
        query the database answers (nothing is loaded): the `Moments` of each of `columns`,
        for each column of `quantiles` its values at those fractions (0 to 1), and for each
        column of `distinct` how many different values it holds."""
        ...


class UnitOfWork(Protocol):
    """One transaction: repositories share it; nothing is visible to others until `commit`.

    Leaving the `async with` block without committing rolls back. After a unique or
    reference violation the transaction can only be rolled back.
    """

    def repo(self, entity_type: type[E]) -> Repository[E]:
        """The repository of `entity_type` bound to this transaction."""
        ...

    def on_commit(self, callback: Callable[[], Any]) -> None:
        """Run `callback` after a successful commit (e.g. send the jobs it created)."""
        ...

    async def commit(self) -> None:
        """Make every write of this unit visible, then run the after-commit callbacks."""
        ...

    async def commit_horizon(self) -> int:
        """The commit-order stamp below which no row can ever appear again: every row with a
        `commit_stamp()` under it is committed (and visible to what this unit reads next),
        and any row inserted by a unit still open, or committed later, is stamped at or above
        it. So the rows stamped in [a, b), b a horizon read earlier, are a fixed set."""
        ...

    async def rollback(self) -> None:
        """Discard every write of this unit."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


UnitOfWorkFactory = Callable[[], UnitOfWork]


class Storage(Protocol):
    """A configured backend: makes units of work, reports health, releases its resources."""

    name: str

    def unit_of_work(self, *, autocommit: bool = False, durable: bool = True) -> UnitOfWork:
        """A new unit of work (use it with `async with`).

        With `autocommit`, every write is committed by itself as it happens and `rollback`
        undoes nothing: for work whose one write is a conditional `update_where`, which then
        costs one statement instead of a transaction's three.

        Not `durable`, its commits may be made without waiting for them to reach the disk
        (PostgreSQL's asynchronous commit; in an autocommit unit, that of its `update_where`
        and `write_where`): a crash of the database server may then lose the last of them,
        never part of one, and never one that a later durable commit saw (the later one makes
        it durable too). For writes whose loss only repeats work: a job's claim, its lease.
        """
        ...

    async def check(self) -> None:
        """Raise `Unavailable` if the backend cannot serve requests."""
        ...

    async def close(self) -> None:
        """Release connections and pools."""
        ...

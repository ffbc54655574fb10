"""Factories: valid entities of any type with every field set to a non-default value."""

from __future__ import annotations

import enum
import itertools
import types
import typing
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar

from app.storage.entity import Entity
from app.storage.mapping import entity_for_table, table_info
from app.storage.protocol import UnitOfWork

E = TypeVar("E", bound=Entity)

_counter = itertools.count(1)
BASE_INSTANT = datetime(2026, 3, 4, 5, 6, 7, 891011, tzinfo=UTC)


def _inner(annotation: Any) -> Any:
    """`X | None` → X."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else Any
    return annotation


def field_value(entity: type[Entity], name: str, n: int) -> Any:
    """A non-default value for column `name` that fits its declared type."""
    info = table_info(entity)
    column = info.table.c[name]
    annotation = _inner(entity.model_fields[name].annotation)
    origin = typing.get_origin(annotation) or annotation
    if name in info.json_columns:
        if origin is list:
            (item,) = typing.get_args(annotation) or (Any,)
            item = typing.get_origin(item) or item
            if item is dict:
                return [{"n": n, "nested": [True, None]}, {"two": "✓"}]
            if item is str:
                return [f"tag-{n}", "two"]
            if item is float:
                return [0.5 * n, -1.25, 3.0]
            if item is int:
                return [n, 2, 3]
            return [n, "two", {"three": 3.5, "nested": [True, None]}]
        args = typing.get_args(annotation)
        value_type = typing.get_origin(args[1]) or args[1] if len(args) == 2 else Any
        if value_type is int:
            return {"production": n, "latest": n + 1}
        if value_type is str:
            return {"x-trace": f"t-{n}", "accept": "application/json"}
        return {"n": n, "text": "é ünïcode ✓", "list": [1, 2.5, "x"], "obj": {"deep": None}}
    if isinstance(origin, type) and issubclass(origin, enum.Enum):
        members = list(origin)
        return members[n % len(members)]
    if origin is bool:
        return n % 2 == 0
    if origin is int:
        return 1000 + n
    if origin is float:
        return n + 0.25
    if origin is Decimal:
        return Decimal(f"{n}.123456")
    if origin is datetime:
        return BASE_INSTANT + timedelta(seconds=n)
    if origin is bytes:
        return bytes([n % 256, 0, 255]) + b"\x00 raw"
    if origin is date:
        return BASE_INSTANT.date() + timedelta(days=n)
    if origin is str:
        length = getattr(column.type, "length", None) or 200
        value = f"{name[:12]}-{n}"
        return value[:length]
    raise TypeError(f"no factory rule for {entity.__name__}.{name}: {annotation!r}")


def build(entity: type[E], **overrides: Any) -> E:
    """An unsaved entity with every column set (references must be given or made by `create`)."""
    n = next(_counter)
    info = table_info(entity)
    values: dict[str, Any] = {}
    for name in info.columns:
        if name in ("created_at", "updated_at", "version", info.stamp):
            continue
        if name in overrides:
            continue
        if any(fk.column == name for fk in info.references):
            continue
        values[name] = field_value(entity, name, n)
    values[info.pk] = f"{entity.__name__.lower()}-{n}"
    values.update(overrides)
    return entity.model_validate(values)


async def create(uow: UnitOfWork, entity: type[E], **overrides: Any) -> E:
    """Add an entity, creating the rows its references need first."""
    info = table_info(entity)
    for fk in info.references:
        if fk.column not in overrides:
            # A self-reference (a job's parent job) ends with a parent that has none.
            top = {fk.column: None} if fk.target_table == info.name else {}
            parent = await create(uow, entity_for_table(fk.target_table), **top)
            overrides[fk.column] = getattr(parent, fk.target_column)
    return await uow.repo(entity).add(build(entity, **overrides))


def comparable(entity: Entity) -> dict[str, Any]:
    """The stored fields of an entity, for equality checks across backends."""
    info = table_info(type(entity))
    # The commit stamp is the backend's, written at commit.
    return {name: getattr(entity, name) for name in info.columns if name != info.stamp}

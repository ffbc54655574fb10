"""What both backends derive from the table metadata: keys, constraints, rows, order, cursors."""

from __future__ import annotations

import base64
import enum
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from functools import cache
from typing import Any, TypeVar

import orjson
import pydantic
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm.instrumentation import manager_of_class
from sqlmodel import SQLModel

from app.core.errors import InvalidInput
from app.storage.entity import COMMIT_STAMP_INFO, Entity
from app.storage.protocol import Append, IfNull, Increment, Op, Where

E = TypeVar("E", bound=Entity)

# Columns every write maintains itself: set on insert, stepped or refreshed on update.
MANAGED_COLUMNS = ("created_at", "updated_at", "version")


def json_dumps(value: Any) -> str:
    """The JSON text both backends store (so both accept and refuse the same values)."""
    return orjson.dumps(value).decode()


def json_loads(text: str | bytes) -> Any:
    return orjson.loads(text)


@dataclass(frozen=True)
class ForeignKey:
    """A reference from `table.column` to `target_table.target_column`."""

    table: str
    column: str
    target_table: str
    target_column: str
    on_delete: str  # CASCADE | SET NULL | RESTRICT


@dataclass(frozen=True)
class TableInfo:
    """Everything generic code needs to know about one entity's table."""

    entity: type[Entity]
    table: sa.Table
    name: str
    pk: str
    columns: frozenset[str]
    json_columns: frozenset[str]
    nullable: frozenset[str]
    unique: tuple[tuple[str, ...], ...]
    references: tuple[ForeignKey, ...]
    # The `commit_stamp()` column, if the entity has one.
    stamp: str | None = None

    @property
    def kind(self) -> str:
        return self.entity.__name__


@cache
def table_info(entity: type[Entity]) -> TableInfo:
    table = entity.__table__  # type: ignore[attr-defined]
    assert isinstance(table, sa.Table), f"{entity.__name__} is not a table entity"
    (pk_col,) = table.primary_key.columns
    unique: list[tuple[str, ...]] = [(pk_col.name,)]
    for constraint in table.constraints:
        if isinstance(constraint, sa.UniqueConstraint):
            unique.append(tuple(c.name for c in constraint.columns))
    for index in table.indexes:
        if index.unique:
            unique.append(tuple(c.name for c in index.columns))
    for column in table.columns:
        if column.unique and (column.name,) not in unique:
            unique.append((column.name,))
    references = tuple(
        ForeignKey(
            table=table.name,
            column=fk.parent.name,
            target_table=fk.column.table.name,
            target_column=fk.column.name,
            on_delete=(fk.ondelete or "RESTRICT").upper(),
        )
        for fk in table.foreign_keys
    )
    return TableInfo(
        entity=entity,
        table=table,
        name=table.name,
        pk=pk_col.name,
        columns=frozenset(c.name for c in table.columns),
        json_columns=frozenset(c.name for c in table.columns if isinstance(c.type, JSONB)),
        nullable=frozenset(c.name for c in table.columns if c.nullable),
        unique=tuple(dict.fromkeys(unique)),
        references=references,
        stamp=next((c.name for c in table.columns if c.info.get(COMMIT_STAMP_INFO)), None),
    )


@cache
def entity_for_table(name: str) -> type[Entity]:
    """The entity class mapped to table `name`."""
    for mapper in SQLModel._sa_registry.mappers:
        if getattr(mapper.class_, "__tablename__", None) == name:
            return mapper.class_
    raise LookupError(f"no entity is mapped to table {name!r}")


def referencing(table: str) -> list[ForeignKey]:
    """Every reference, in any table, that points at `table`."""
    found: list[ForeignKey] = []
    for other in SQLModel.metadata.tables.values():
        for fk in other.foreign_keys:
            if fk.column.table.name == table:
                found.append(
                    ForeignKey(
                        table=other.name,
                        column=fk.parent.name,
                        target_table=table,
                        target_column=fk.column.name,
                        on_delete=(fk.ondelete or "RESTRICT").upper(),
                    )
                )
    return found


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


@cache
def _row_model(entity: type[Entity]) -> type[pydantic.BaseModel]:
    """A plain pydantic twin of `entity`'s columns: validates as the entity does, without the
    SQLAlchemy attribute instrumentation that makes validating a table model ~20x slower."""
    fields: dict[str, Any] = {
        name: (field.annotation, field) for name, field in entity.model_fields.items()
    }
    model: type[pydantic.BaseModel] = pydantic.create_model(f"{entity.__name__}Row", **fields)
    return model


def _enum_of(annotation: Any) -> type[enum.Enum] | None:
    """The enum class of a `SomeEnum` or `SomeEnum | None` annotation, if it is one."""
    candidates = typing.get_args(annotation) or (annotation,)
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, enum.Enum):
            return candidate
    return None


@cache
def _enum_columns(entity: type[Entity]) -> tuple[tuple[str, type[enum.Enum]], ...]:
    found = ((name, _enum_of(field.annotation)) for name, field in entity.model_fields.items())
    return tuple((name, cls) for name, cls in found if cls is not None)


def to_row(entity: Entity) -> dict[str, Any]:
    """Validate `entity` against its declared types and return its column values.

    Both backends store exactly this (JSON columns through `json_dumps`), so a value one
    refuses the other refuses too.
    """
    cls = type(entity)
    info = table_info(cls)
    # Read from the instance's dict, not through SQLAlchemy's attribute instrumentation (which
    # keeps the values there too): half of the cost of a row.
    held = entity.__dict__
    try:
        checked = _row_model(cls).__pydantic_validator__.validate_python(
            {name: held[name] if name in held else getattr(entity, name) for name in info.columns}
        )
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise InvalidInput(f"{info.kind}.{field}: {first['msg']}", param=field) from exc
    values = checked.__dict__
    return {name: _plain(values[name]) for name in info.columns}


def validate(entity: type[E], data: typing.Mapping[str, Any]) -> E:
    """An entity from untrusted values (a JSON message, say), validated as `to_row` would."""
    try:
        checked = _row_model(entity).model_validate(data)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise InvalidInput(f"{entity.__name__}.{field}: {first['msg']}", param=field) from exc
    return construct(entity, **dict(checked))


def check_changes(entity: type[Entity], changes: typing.Mapping[str, Any]) -> dict[str, Any]:
    """Validate some of an entity's columns as `to_row` validates them all; the stored values."""
    columns = _changeable(entity)
    checked: dict[str, Any] = {}
    for name, value in changes.items():
        column = columns.get(name)
        if column is None:
            info = table_info(entity)
            check_column(info, name)
            raise ValueError(f"{info.kind}.{name} is kept by the storage, not changed directly")
        try:
            checked[name] = column.check(value)
        except pydantic.ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in (name, *first["loc"]) if p != "")
            raise InvalidInput(f"{column.kind}.{where}: {first['msg']}", param=name) from exc
    return checked


@dataclass(frozen=True, slots=True)
class _Column:
    """How a change of one column is checked (built once per column)."""

    kind: str
    name: str
    adapter: pydantic.TypeAdapter[Any]
    integer: bool
    items: pydantic.TypeAdapter[Any] | None  # a JSON list column's validator

    def check(self, value: Any) -> Any:
        if isinstance(value, Increment):
            if not self.integer or isinstance(value.by, bool):
                raise InvalidInput(
                    f"{self.kind}.{self.name} is not a number to increment", param=self.name
                )
            if not isinstance(value.by, int):
                raise InvalidInput(
                    f"{self.kind}.{self.name}: increments are whole numbers", param=self.name
                )
            return value
        if isinstance(value, Append):
            if self.items is None:
                raise InvalidInput(
                    f"{self.kind}.{self.name} is not a list to append to", param=self.name
                )
            return Append(tuple(self.items.validate_python(list(value.items))))
        if isinstance(value, IfNull):
            return IfNull(_plain(self.adapter.validate_python(value.value)))
        return _plain(self.adapter.validate_python(value))


@cache
def _changeable(entity: type[Entity]) -> dict[str, _Column]:
    """The columns a change may name (not the key, nor what storage keeps itself)."""
    info = table_info(entity)
    return {
        name: _Column(
            kind=info.kind,
            name=name,
            adapter=_column_adapter(entity, name),
            integer=isinstance(info.table.c[name].type, sa.Integer),
            items=_list_adapter(entity, name) if name in info.json_columns else None,
        )
        for name in sorted(info.columns)
        if name != info.pk and name not in MANAGED_COLUMNS
    }


@cache
def _list_adapter(entity: type[Entity], name: str) -> pydantic.TypeAdapter[Any] | None:
    """The validator of a list column's items, as a list (None: not a list column)."""
    annotation: Any = _row_model(entity).model_fields[name].annotation
    if typing.get_origin(annotation) is not list:
        return None
    return pydantic.TypeAdapter(annotation)


@cache
def _column_adapter(entity: type[Entity], name: str) -> pydantic.TypeAdapter[Any]:
    field = _row_model(entity).model_fields[name]
    annotated: Any = typing.Annotated[field.annotation, field]
    return pydantic.TypeAdapter(annotated)


def from_row(entity: type[E], row: Any) -> E:
    """Build a fresh entity from stored column values.

    Rows were validated by `to_row` on their way in, so they are only given their enum types
    back rather than validated again.
    """
    values = dict(row)
    for name, enum_cls in _enum_columns(entity):
        value = values.get(name)
        if value is not None:
            values[name] = enum_cls(value)
    return construct(entity, **values)


def construct(entity: type[E], **values: Any) -> E:
    """An entity from trusted values (defaults for the rest), without validation.

    Table models do not validate in their constructor either, but it sets every field through
    SQLAlchemy's instrumentation, which costs several times more; `to_row` validates on the way
    to storage whichever way the entity was made.
    """
    manager = _manager(entity)
    for name, default, factory in _defaults(entity):
        if name not in values:
            values[name] = factory() if factory is not None else default
    fields = _plain_fields(entity)
    if fields is None:
        built = typing.cast(E, entity.model_construct(**values))
        manager._new_state_if_none(built)
        return built
    # What `model_construct` does for a model without aliases, extras or post-init hooks,
    # every field given, without its per-field lookups (a third of reading a row); and what
    # SQLModel's `__new__` does, which sets the same three slots.
    built = object.__new__(entity)
    _set = object.__setattr__
    _set(built, "__dict__", {name: values[name] for name in fields})
    _set(built, "__pydantic_fields_set__", set(fields))
    _set(built, "__pydantic_extra__", None)
    _set(built, "__pydantic_private__", None)
    # Table models keep their attributes through SQLAlchemy instrumentation, which needs a
    # state. The instance is new, so it has none: `_new_state_if_none` would first look for one,
    # and a missing attribute costs a raised AttributeError in pydantic's `__getattr__` (half
    # of building a row).
    manager._state_setter(built, manager._state_constructor(built, manager))
    return built


@cache
def _plain_fields(entity: type[Entity]) -> tuple[str, ...] | None:
    """The field names, when building `entity` needs nothing but its values (else None)."""
    fields = entity.model_fields
    if (
        entity.__pydantic_post_init__
        or entity.__pydantic_root_model__
        or entity.model_config.get("extra") == "allow"
        or entity.__private_attributes__
        or any(f.alias is not None or f.validation_alias is not None for f in fields.values())
    ):
        return None
    return tuple(fields)


@cache
def _defaults(entity: type[Entity]) -> tuple[tuple[str, Any, Callable[[], Any] | None], ...]:
    """Each field's default value or factory (the entities' factories take no arguments)."""
    found: list[tuple[str, Any, Callable[[], Any] | None]] = []
    for name, field in entity.model_fields.items():
        if field.default_factory is not None:
            found.append((name, None, typing.cast(Callable[[], Any], field.default_factory)))
        elif not field.is_required():
            found.append((name, field.default, None))
    return tuple(found)


@cache
def _manager(entity: type[Entity]) -> Any:
    # Instrumented attributes work only once the mappers are configured; constructing an
    # entity normally does that, building one as `construct` does must ask for it.
    sa.orm.configure_mappers()
    return manager_of_class(entity)


# ---- ordering and cursors -------------------------------------------------------------


def parse_order(info: TableInfo, order_by: tuple[str, ...] | list[str]) -> list[tuple[str, bool]]:
    """`["-created_at"]` → `[("created_at", True), (pk, False)]`; the key makes order total."""
    keys: list[tuple[str, bool]] = []
    for spec in order_by:
        desc = spec.startswith("-")
        name = spec.lstrip("-+")
        check_column(info, name)
        if name in info.json_columns:
            raise ValueError(f"cannot order {info.kind} by JSON column {name!r}")
        keys.append((name, desc))
    if info.pk not in {name for name, _ in keys}:
        keys.append((info.pk, keys[-1][1] if keys else False))
    return keys


def find_order(
    info: TableInfo,
    order_by: Sequence[str],
    limit: int | None,
    after: str | None,
    where: Sequence[Where] = (),
) -> list[tuple[str, bool]]:
    """The sort keys of a `find`; a paged one refuses a nullable key, which a cursor cannot
    pass (NULL compares as neither before nor after it), unless a condition leaves no null
    in it (`Where.is_null(name, False)`, or any comparison)."""
    keys = parse_order(info, tuple(order_by))
    paged = limit is not None or after is not None
    present = {c.field for c in where if c.op is not Op.IS_NULL or c.value is False}
    if paged and any(name in info.nullable - present for name, _ in keys):
        raise ValueError("cursor pagination needs sort columns that cannot be null")
    return keys


def check_column(info: TableInfo, name: str) -> None:
    if name not in info.columns:
        raise ValueError(f"{info.kind} has no column {name!r}")


def numeric_column(info: TableInfo, name: str) -> type[int] | type[float]:
    """What `summarize` adds up in column `name`: `int` (integers and booleans, exactly) or
    `float`; any other column is refused."""
    check_column(info, name)
    kind = info.table.columns[name].type
    if isinstance(kind, sa.Boolean | sa.Integer):
        return int
    if isinstance(kind, sa.Float | sa.Numeric):
        return float
    raise ValueError(f"{info.kind}.{name} is not a numeric column")


def quantile(ordered: Sequence[float], fraction: float) -> float | None:
    """The value at `fraction` (0 to 1) of sorted values, linearly interpolated between the
    closest ranks (PostgreSQL's `percentile_cont`, numpy's default); None when empty."""
    if not ordered:
        return None
    position = fraction * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (position - low))


def _encode_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return {"t": value.isoformat()}
    if isinstance(value, date):
        return {"D": value.isoformat()}
    if isinstance(value, Decimal):
        return {"d": str(value)}
    return _plain(value)


def _decode_value(value: Any) -> Any:
    if isinstance(value, dict):
        if "t" in value:
            return datetime.fromisoformat(value["t"])
        if "d" in value:
            return Decimal(value["d"])
        if "D" in value:
            return date.fromisoformat(value["D"])
    return value


def encode_cursor(keys: list[tuple[str, bool]], row: dict[str, Any]) -> str:
    """An opaque token holding the ordering and the last row's sort values."""
    payload = {"k": [[n, d] for n, d in keys], "v": [_encode_value(row[n]) for n, _ in keys]}
    return base64.urlsafe_b64encode(orjson.dumps(payload)).decode().rstrip("=")


def decode_cursor(keys: list[tuple[str, bool]], cursor: str) -> list[Any]:
    """The sort values stored in `cursor`; refuses a cursor made for another ordering."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        payload = orjson.loads(base64.urlsafe_b64decode(padded))
        stored = [(str(n), bool(d)) for n, d in payload["k"]]
        values = [_decode_value(v) for v in payload["v"]]
    except (ValueError, KeyError, TypeError, ArithmeticError) as exc:  # decimal.InvalidOperation
        raise InvalidInput("the pagination cursor is malformed", param="after") from exc
    if stored != keys or len(values) != len(keys):
        raise InvalidInput("the pagination cursor belongs to another ordering", param="after")
    return values

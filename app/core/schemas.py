"""Response shapes shared by several domains."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache
from typing import Annotated, Any, ClassVar, Generic, Literal, Protocol, Self, TypeVar

from fastapi import Query
from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

T = TypeVar("T")
E = TypeVar("E")
E_co = TypeVar("E_co", covariant=True)
M = TypeVar("M", bound=BaseModel)

# The query parameters of a cursor-paged list: `limit: PageLimit = 20, after: PageAfter = None`.
PageLimit = Annotated[int, Query(ge=1, le=100, description="How many items at most.")]
PageAfter = Annotated[str | None, Query(description="The `next_cursor` of the previous page.")]


def from_entity(shape: type[M], entity: BaseModel, **given: Any) -> M:
    """`shape` filled from the stored `entity`: each field it stores under the same name is
    copied, and `given` holds the rest (computed, renamed or masked ones).

    A response shape so says only where it differs from what is stored; a stored field the
    shape does not declare (a secret, a hash, the row version) is never copied.
    """
    copied = {n: getattr(entity, n) for n in _shared_fields(shape, type(entity)) if n not in given}
    return shape(**copied, **given)


@cache
def _shared_fields(shape: type[BaseModel], stored: type[BaseModel]) -> tuple[str, ...]:
    return tuple(name for name in shape.model_fields if name in stored.model_fields)


class Paged(Protocol[E_co]):
    """One page of stored items and the cursor of the next: what `app.storage.protocol.Page`
    holds (a protocol, since `app.core` sits below `app.storage`)."""

    @property
    def items(self) -> Sequence[E_co]: ...

    @property
    def next_cursor(self) -> str | None: ...


class PartialUpdate(BaseModel):
    """Changes to a stored resource (a PATCH body): a field left out is kept; a field sent as
    null clears it when it is in `clearable`, and is refused for any other field."""

    model_config = ConfigDict(extra="forbid")

    clearable: ClassVar[frozenset[str]] = frozenset()

    @field_validator("*")
    @classmethod
    def _refuse_nulls(cls, value: Any, info: ValidationInfo) -> Any:
        # A field validator, so the error names the field that was sent as null.
        if value is None and info.field_name not in cls.clearable:
            raise ValueError(f"{info.field_name} cannot be null")
        return value


class Deleted(BaseModel):
    """OpenAI's answer to a delete: `{"id", "object", "deleted": true}`."""

    id: str
    object: str
    deleted: bool = True


class ListPage(BaseModel, Generic[T]):
    """One page of a cursor-paged list of our own resources.

    OpenAI-compatible lists (`/v1/models`, `/v1/files`, `/v1/batches`) keep OpenAI's shapes
    instead. Domains subclass it per item type (`class PromptList(ListPage[PromptRead])`) rather
    than aliasing the parametrised class, so the OpenAPI component keeps the domain's name.
    """

    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool
    next_cursor: str | None = None

    @classmethod
    def of(cls, page: Paged[E], item: Callable[[E], T]) -> Self:
        """The page with each stored entity turned into its response shape by `item`."""
        return cls(
            data=[item(e) for e in page.items],
            has_more=page.next_cursor is not None,
            next_cursor=page.next_cursor,
        )

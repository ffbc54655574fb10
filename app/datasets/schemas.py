"""Datasets and their items as the admin API accepts and shows them."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.core.ids import SLUG_MAX, is_slug
from app.core.schemas import ListPage, PartialUpdate, from_entity
from app.datasets.entities import Dataset, DatasetChange, DatasetItem, DatasetVersion
from app.gateway.schemas import ChatMessage

MAX_ITEMS = 10_000  # per dataset: a batch runs each through every variant
MAX_ITEMS_PER_REQUEST = 1_000

VariableValue = str | int | float | bool | None


class ExportFormat(StrEnum):
    JSONL = "jsonl"
    CSV = "csv"


class ItemInput(BaseModel):
    """What an item sends: a conversation, or the variables of an experiment's prompt."""

    model_config = ConfigDict(extra="forbid")

    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    variables: dict[Annotated[str, Field(min_length=1, max_length=100)], VariableValue] | None = (
        None
    )

    @model_validator(mode="after")
    def _one_of(self) -> Self:
        if (self.messages is None) == (self.variables is None):
            raise ValueError("give either messages or variables")
        return self

    def stored(self) -> dict[str, Any]:
        if self.messages is not None:
            return {"messages": [m.model_dump(exclude_none=True) for m in self.messages]}
        return {"variables": self.variables}


class ItemCreate(BaseModel):
    """One item: its input, what it should produce if known, and notes about it."""

    model_config = ConfigDict(extra="forbid")

    input: ItemInput
    expected: Any = None
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] = (
        Field(default_factory=dict, max_length=16)
    )


class ItemUpdate(PartialUpdate):
    """Changes to one item (a new version of its dataset): what is left out is kept."""

    clearable = frozenset({"expected"})

    input: ItemInput | None = None
    expected: Any = None
    metadata: (
        dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None
    ) = Field(default=None, max_length=16)


class ItemsAdd(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[ItemCreate] = Field(min_length=1, max_length=MAX_ITEMS_PER_REQUEST)


def _slug(value: str) -> str:
    if not is_slug(value):
        raise ValueError(
            f"must be 1 to {SLUG_MAX} letters, digits and inner hyphens (e.g. 'support-tickets')"
        )
    return value


class DatasetCreate(BaseModel):
    """A new dataset, with its first items if given."""

    model_config = ConfigDict(extra="forbid")

    id: str
    name: str = Field(min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=2000)
    items: list[ItemCreate] = Field(default_factory=list, max_length=MAX_ITEMS_PER_REQUEST)

    _id = field_validator("id")(_slug)


class DatasetUpdate(PartialUpdate):
    clearable = frozenset({"description"})

    name: str | None = Field(default=None, min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=2000)


class DatasetRead(BaseModel):
    """A dataset; `version` moves on whenever its items change (every version stays
    readable)."""

    id: str
    object: Literal["dataset"] = "dataset"
    name: str
    description: str | None
    version: int = Field(description="The current version: each change of items makes one")
    item_count: int = Field(description="Items in the current version")
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, dataset: Dataset) -> DatasetRead:
        return from_entity(cls, dataset, version=dataset.current_version)


class DatasetVersionRead(BaseModel):
    """One version of a dataset: the change that made it, and its size."""

    object: Literal["dataset.version"] = "dataset.version"
    dataset_id: str
    version: int
    change: DatasetChange
    items_changed: int
    item_count: int
    created_at: datetime

    @classmethod
    def of(cls, version: DatasetVersion) -> DatasetVersionRead:
        return from_entity(cls, version, version=version.number)


class DatasetVersionList(ListPage[DatasetVersionRead]):
    pass


class DatasetList(ListPage[DatasetRead]):
    pass


class ItemRead(BaseModel):
    id: str
    object: Literal["dataset.item"] = "dataset.item"
    dataset_id: str
    position: int
    input: dict[str, Any]
    expected: Any
    metadata: dict[str, str]
    created_at: datetime
    version: int = Field(description="The version of the dataset that wrote the item so")

    @classmethod
    def of(cls, item: DatasetItem) -> ItemRead:
        return from_entity(cls, item, id=item.item_id, metadata=item.meta, version=item.valid_from)


class ItemList(ListPage[ItemRead]):
    pass

"""The dataset tables: named collections of inputs (with optional expected outputs) that
experiment batches and evaluations run through models, with every version kept.

An item's row is valid from the version that wrote it up to (not including) the version that
replaced or removed it, so version N is the rows with `valid_from <= N < valid_to`: a change
writes the rows it changes, never a copy of the dataset.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import sqlalchemy as sa

from app.storage.entity import Entity, choice, json_object, json_value, pk, reference, text

# `valid_to` of the rows of the current version (no version has replaced them yet).
CURRENT = 2**31 - 1


class Dataset(Entity, table=True):
    """A dataset; `current_version` moves on with every change to its items."""

    __tablename__ = "datasets"

    id: str = pk()
    name: str = text(max_length=200)
    description: str | None = text(None)
    current_version: int = 1
    item_count: int = 0  # of the current version


class DatasetChange(StrEnum):
    """What made a version."""

    CREATED = "created"
    ITEMS_ADDED = "items_added"
    IMPORTED = "imported"
    ITEM_UPDATED = "item_updated"
    ITEM_DELETED = "item_deleted"


class DatasetVersion(Entity, table=True):
    """One version of a dataset: the change that made it and how many items it holds."""

    __tablename__ = "dataset_versions"

    id: str = pk()  # "<dataset id>@<number>": two changes cannot make the same version
    dataset_id: str = reference("datasets.id")
    number: int
    change: DatasetChange = choice(DatasetChange)
    items_changed: int = 0
    item_count: int = 0


class DatasetItem(Entity, table=True):
    """One input: chat `messages` or prompt `variables`, the `expected` output if known, as it
    was over a range of versions of its dataset."""

    __tablename__ = "dataset_items"
    __table_args__ = (
        # Positions are unique within a version; the key leads with dataset_id, so it also
        # serves the reads of the current version (valid_to = CURRENT) in order.
        sa.UniqueConstraint(
            "dataset_id",
            "valid_to",
            "position",
            name="uq_dataset_items_dataset_id_valid_to_position",
        ),
    )

    id: str = pk()  # "<item_id>.<valid_from>"
    item_id: str = text(max_length=48)  # the item, the same in every version it is in
    dataset_id: str = reference("datasets.id", index=False)
    position: int
    valid_from: int = 1
    valid_to: int = CURRENT
    input: dict[str, Any] = json_object()
    expected: Any = json_value()
    meta: dict[str, str] = json_object()

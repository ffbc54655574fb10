"""The dataset tables: named collections of inputs (with optional expected outputs) that
experiment batches and evaluations run through models."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from app.storage.entity import Entity, json_object, json_value, pk, reference, text


class Dataset(Entity, table=True):
    """A dataset; `revision` moves on with every change to its items."""

    __tablename__ = "datasets"

    id: str = pk()
    name: str = text(max_length=200)
    description: str | None = text(None)
    revision: int = 1
    item_count: int = 0


class DatasetItem(Entity, table=True):
    """One input: chat `messages` or prompt `variables`, the `expected` output if known."""

    __tablename__ = "dataset_items"
    __table_args__ = (
        sa.UniqueConstraint("dataset_id", "position", name="uq_dataset_items_dataset_id_position"),
    )

    id: str = pk()
    # The unique key leads with dataset_id, so it serves lookups by dataset as well.
    dataset_id: str = reference("datasets.id", index=False)
    position: int
    input: dict[str, Any] = json_object()
    expected: Any = json_value()
    meta: dict[str, str] = json_object()

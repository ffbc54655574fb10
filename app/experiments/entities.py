"""The experiment tables: A/B experiments over model variants, and one record per request."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa

from app.storage.entity import Entity, big, choice, instant, json_list, pk, reference, text


class ExperimentStatus(StrEnum):
    DRAFT = "draft"
    ACTIVE = "active"
    PAUSED = "paused"
    COMPLETED = "completed"


class Experiment(Entity, table=True):
    """An A/B experiment: variants of a model's configuration and the traffic each receives."""

    __tablename__ = "experiments"

    id: str = pk()
    name: str = text(max_length=200)
    description: str | None = text(None)
    status: ExperimentStatus = choice(ExperimentStatus, ExperimentStatus.DRAFT, index=True)
    # Each variant: id, name, description, config (model reference or override), is_control.
    variants: list[dict[str, Any]] = json_list()
    # Each allocation: variant_id and percentage; they sum to 100.
    traffic_allocation: list[dict[str, Any]] = json_list()
    started_at: datetime | None = instant()
    completed_at: datetime | None = instant()
    enabled: bool = True


class ExperimentRecord(Entity, table=True):
    """The outcome of one request served by one variant of an experiment."""

    __tablename__ = "experiment_records"
    __table_args__ = (
        sa.Index(
            "ix_experiment_records_experiment_id_variant_id_created_at",
            "experiment_id",
            "variant_id",
            "created_at",
        ),
    )

    id: str = pk()
    # The composite index leads with experiment_id, so it serves lookups by experiment as well.
    experiment_id: str = reference("experiments.id", index=False)
    variant_id: str = text(max_length=64)
    api_key_id: str | None = text(None, max_length=64)
    model_id: str = text(max_length=64)
    input_tokens: int = 0
    output_tokens: int = 0
    cost_micros: int = big()
    latency_ms: int = 0
    success: bool = True
    error: str | None = text(None)
    operation_id: str | None = text(None, max_length=64)  # the batch job that made the request

"""The experiment tables: A/B experiments over variants of a model or prompt, and one record
per call a variant served (live traffic or an offline batch)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa

from app.storage.entity import Entity, big, choice, instant, json_list, pk, reference, text


class ExperimentStatus(StrEnum):
    """draft → running ⇄ paused → completed (`app.experiments.lifecycle` holds the moves)."""

    DRAFT = "draft"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"


class TargetKind(StrEnum):
    """What calls an experiment intercepts: those on a model (or chain), or those whose
    messages use a stored prompt."""

    MODEL = "model"
    PROMPT = "prompt"


class UnitKind(StrEnum):
    """What is hashed to assign a variant, so that one unit always sees the same one."""

    API_KEY = "api_key"
    USER = "user"  # the request's `user` field
    HEADER = "header"  # the `X-Experiment-Unit` header the client sets


class Metric(StrEnum):
    """What results compare; `SUCCESS_RATE` is a proportion, the others are means."""

    SUCCESS_RATE = "success_rate"
    LATENCY_MS = "latency_ms"
    FIRST_TOKEN_MS = "first_token_ms"
    INPUT_TOKENS = "input_tokens"
    OUTPUT_TOKENS = "output_tokens"
    COST_MICROS = "cost_micros"
    FEEDBACK_SCORE = "feedback_score"


class RecordSource(StrEnum):
    LIVE = "live"  # a client's call, intercepted
    OFFLINE = "offline"  # one item of a dataset through one variant, in an experiment batch


class Experiment(Entity, table=True):
    """Variants of the calls on one model or prompt, and the share of traffic each gets."""

    __tablename__ = "experiments"

    id: str = pk()
    name: str = text(max_length=200)
    description: str | None = text(None)
    status: ExperimentStatus = choice(ExperimentStatus, ExperimentStatus.DRAFT, index=True)
    target_kind: TargetKind = choice(TargetKind)
    # The model or chain id callers put in `model`, or the id of the stored prompt.
    target: str = text(max_length=200)
    unit: UnitKind = choice(UnitKind, UnitKind.API_KEY)
    salt: str = text(max_length=64)
    # Each: id, name, description, control, weight (basis points, summing to 10,000), and
    # what it changes: model, prompt_version, params.
    variants: list[dict[str, Any]] = json_list()
    primary_metric: Metric = choice(Metric, Metric.SUCCESS_RATE)
    # The smallest difference from control, in the primary metric's units, worth acting on.
    minimum_effect: float = 0.0
    started_at: datetime | None = instant()
    completed_at: datetime | None = instant()


class ExperimentRecord(Entity, table=True):
    """The outcome of one call served by one variant of an experiment."""

    __tablename__ = "experiment_records"
    __table_args__ = (
        sa.Index(
            "ix_experiment_records_experiment_id_source_variant_id",
            "experiment_id",
            "source",
            "variant_id",
        ),
        # An offline item is run once per variant per batch: a re-run after a crash finds the
        # records written and skips them. Live records (no item) are not constrained.
        sa.UniqueConstraint(
            "operation_id",
            "item_id",
            "variant_id",
            name="uq_experiment_records_operation_id_item_id_variant_id",
        ),
    )

    id: str = pk()
    # The composite index leads with experiment_id, so it serves lookups by experiment as well.
    experiment_id: str = reference("experiments.id", index=False)
    variant_id: str = text(max_length=64)
    source: RecordSource = choice(RecordSource, RecordSource.LIVE)
    unit: str | None = text(None, max_length=256)
    api_key_id: str | None = text(None, max_length=64)
    # The request id the caller was answered with (feedback names it), or the job's id.
    request_id: str | None = text(None, max_length=128, index=True)
    operation_id: str | None = text(None, max_length=64)  # the job that made the call
    item_id: str | None = text(None, max_length=64)  # the dataset item, offline
    model_id: str | None = text(None, max_length=200)  # the model that answered
    input_tokens: int = 0
    output_tokens: int = 0
    cost_micros: int = big()
    latency_ms: int = 0
    first_token_ms: int | None = None  # streams only
    success: bool = True
    error: str | None = text(None)
    feedback_score: float | None = None
    feedback_label: str | None = text(None, max_length=100)
    output: str | None = text(None)  # the answer's text, kept for offline items only

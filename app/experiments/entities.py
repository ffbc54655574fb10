"""The experiment tables: A/B experiments over variants of a model or prompt, and one record
per call a variant served (live traffic or an offline batch)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field

from app.storage.entity import (
    Entity,
    big,
    choice,
    commit_stamp,
    instant,
    json_list,
    json_object,
    pk,
    reference,
    text,
)


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
        # The records of an experiment in a range of commit stamps: those not yet in the
        # totals (at or above its watermark), and those one roll-up counts.
        sa.Index(
            "ix_experiment_records_experiment_id_commit_stamp", "experiment_id", "commit_stamp"
        ),
        # The least and greatest feedback score of a variant, read without a scan (the key
        # last, as `find` orders: many records share a score).
        sa.Index(
            "ix_experiment_records_experiment_id_variant_id_score_id",
            "experiment_id",
            "variant_id",
            "feedback_score",
            "id",
            postgresql_where=sa.text("feedback_score IS NOT NULL"),
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
    # When it was committed, in commit order: the totals count the records stamped below
    # the experiment's `ExperimentWatermark`.
    commit_stamp: int | None = commit_stamp()
    # Offline, on a variant's record: this record's value minus control's on the same item
    # (both successful for the metrics of successes), for the paired tests of a batch.
    success_diff: int | None = None
    latency_ms_diff: int | None = None
    first_token_ms_diff: int | None = None
    input_tokens_diff: int | None = None
    output_tokens_diff: int | None = None
    cost_micros_diff: int | None = big(None)


class ExperimentFeedbackChange(Entity, table=True):
    """Feedback that changed a record already counted in the totals: what it adds to them
    (the new score and label in, the old ones out), rolled up like a record."""

    __tablename__ = "experiment_feedback_changes"
    __table_args__ = (
        sa.Index(
            "ix_experiment_feedback_changes_experiment_id_commit_stamp",
            "experiment_id",
            "commit_stamp",
        ),
    )

    id: str = pk()
    experiment_id: str = reference("experiments.id")
    record_id: str = text(max_length=64)
    variant_id: str = text(max_length=64)
    source: RecordSource = choice(RecordSource, RecordSource.LIVE)
    operation_id: str | None = text(None, max_length=64)
    scored: int = 0  # +1: a first score; 0: one replaced or none; -1 never happens today
    score: float = 0.0  # the new score minus the old one
    score_squares: float = 0.0  # the new score squared minus the old one squared
    label_added: str | None = text(None, max_length=100)
    label_removed: str | None = text(None, max_length=100)
    commit_stamp: int | None = commit_stamp()


class ExperimentWatermark(Entity, table=True):
    """How far the totals of an experiment go: they count its records and feedback changes
    stamped below `watermark` (`commit_stamp`), none at or above it. A roll-up moves it in
    the transaction that adds to the totals, version-checked, so two cannot count the same
    range; feedback written in place on a record not yet counted steps its version too."""

    __tablename__ = "experiment_watermarks"

    id: str = Field(  # the experiment's id
        primary_key=True,
        max_length=64,
        sa_column_args=[sa.ForeignKey("experiments.id", ondelete="CASCADE")],
    )
    watermark: int = big()


class ExperimentTotals(Entity, table=True):
    """What the counted records of one variant sum to, live or in one batch: calls, units,
    the moments of each metric (exact integers for integer metrics), latency sketches, and
    feedback label tallies."""

    __tablename__ = "experiment_totals"
    __table_args__ = (
        sa.Index(
            "ix_experiment_totals_experiment_id_source_operation_id",
            "experiment_id",
            "source",
            "operation_id",
        ),
    )

    id: str = pk()  # derived from experiment, source, batch and variant (`totals_id`)
    experiment_id: str = reference("experiments.id", index=False)
    variant_id: str = text(max_length=64)
    source: RecordSource = choice(RecordSource, RecordSource.LIVE)
    operation_id: str | None = text(None, max_length=64)  # the batch; null for live calls
    calls: int = big()
    units: int = big()  # distinct units (one `ExperimentUnit` each)
    # metric -> [n, sum, sum of squares, least, greatest]; integer sums as decimal strings
    moments: dict[str, Any] = json_object()
    # metric -> sketch bin -> count (`app.experiments.totals`)
    sketches: dict[str, Any] = json_object()
    labels: dict[str, Any] = json_object()  # feedback label -> count


class ExperimentUnit(Entity, table=True):
    """One unit seen by the variant of one `ExperimentTotals` row: the count of its units is
    exact across roll-ups."""

    __tablename__ = "experiment_units"

    id: str = pk()  # derived from the totals row and the unit (`unit_id`)
    experiment_id: str = reference("experiments.id")
    totals_id: str = text(max_length=64)

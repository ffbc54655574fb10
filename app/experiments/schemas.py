"""Experiments, their variants, results, feedback and batches as the API accepts and shows them."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.core.ids import SLUG_MAX, is_slug
from app.core.schemas import ListPage, PartialUpdate, from_entity
from app.experiments.entities import (
    Experiment,
    ExperimentStatus,
    Metric,
    RecordSource,
    TargetKind,
    UnitKind,
)
from app.gateway.schemas import MAX_TOKENS, ModelName

MAX_VARIANTS = 10


def _slug(value: str) -> str:
    if not is_slug(value):
        raise ValueError(
            f"must be 1 to {SLUG_MAX} letters, digits and inner hyphens (e.g. 'short-prompt')"
        )
    return value


class VariantParams(BaseModel):
    """Request parameters a variant sets, over whatever the caller sent (OpenAI's ranges)."""

    model_config = ConfigDict(extra="forbid")

    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2, allow_inf_nan=False)
    seed: int | None = None


class VariantSpec(BaseModel):
    """One arm of an experiment: what it changes in the call, and its share of the units."""

    model_config = ConfigDict(extra="forbid")

    id: str
    name: str | None = Field(default=None, min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=2000)
    control: bool = False
    allocation: float = Field(
        gt=0, le=100, allow_inf_nan=False, description="Percent of units, to 0.01; all sum to 100"
    )
    model: ModelName | None = Field(
        default=None, description="The model or chain to call instead of the one asked for"
    )
    prompt_version: int | None = Field(
        default=None, ge=1, description="The version of the experiment's prompt to render"
    )
    params: VariantParams = Field(default_factory=VariantParams)

    _id = field_validator("id")(_slug)

    @field_validator("allocation")
    @classmethod
    def _hundredths(cls, value: float) -> float:
        if abs(value * 100 - round(value * 100)) > 1e-6:
            raise ValueError("must be a percentage with at most two decimals, e.g. 33.33")
        return value


class ExperimentCreate(BaseModel):
    """A new experiment, created as a draft."""

    model_config = ConfigDict(extra="forbid")

    id: str
    name: str = Field(min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=2000)
    target_kind: TargetKind = Field(
        description="`model`: calls on a model or chain; `prompt`: calls using a stored prompt"
    )
    target: str = Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")
    unit: UnitKind = Field(
        default=UnitKind.API_KEY,
        description="What is hashed to assign a variant: the API key, the request's `user`, "
        "or the `X-Experiment-Unit` header",
    )
    salt: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description="Mixed into the hash; a new salt reshuffles the units (random if omitted)",
    )
    variants: list[VariantSpec] = Field(min_length=2, max_length=MAX_VARIANTS)
    primary_metric: Metric = Metric.SUCCESS_RATE
    minimum_effect: float = Field(
        default=0.0,
        ge=0,
        allow_inf_nan=False,
        description="The smallest difference from control, in the primary metric's units, "
        "that makes a winner",
    )

    _id = field_validator("id")(_slug)


class ExperimentUpdate(PartialUpdate):
    """Changes to an experiment. A draft takes any; once started, only its name and
    description change, since anything else would bias what was already measured."""

    clearable = frozenset({"description"})

    name: str | None = Field(default=None, min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=2000)
    target_kind: TargetKind | None = None
    target: str | None = Field(
        default=None, min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$"
    )
    unit: UnitKind | None = None
    salt: str | None = Field(default=None, min_length=1, max_length=64)
    variants: list[VariantSpec] | None = Field(default=None, min_length=2, max_length=MAX_VARIANTS)
    primary_metric: Metric | None = None
    minimum_effect: float | None = Field(default=None, ge=0, allow_inf_nan=False)


class VariantRead(BaseModel):
    id: str
    name: str
    description: str | None
    control: bool
    allocation: float
    model: str | None
    prompt_version: int | None
    params: dict[str, Any]


class ExperimentRead(BaseModel):
    """An experiment and its variants."""

    id: str
    object: Literal["experiment"] = "experiment"
    name: str
    description: str | None
    status: ExperimentStatus
    target_kind: TargetKind
    target: str
    unit: UnitKind
    salt: str
    variants: list[VariantRead]
    primary_metric: Metric
    minimum_effect: float
    started_at: datetime | None
    completed_at: datetime | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, experiment: Experiment) -> ExperimentRead:
        variants = [
            VariantRead(
                id=v["id"],
                name=v.get("name") or v["id"],
                description=v.get("description"),
                control=bool(v.get("control")),
                allocation=v["weight"] / 100,
                model=v.get("model"),
                prompt_version=v.get("prompt_version"),
                params=v.get("params") or {},
            )
            for v in experiment.variants
        ]
        return from_entity(cls, experiment, variants=variants)


class ExperimentList(ListPage[ExperimentRead]):
    pass


# ---- feedback ---------------------------------------------------------------------------------


class FeedbackCreate(BaseModel):
    """An outcome of a call the caller made: a score, a label, or both."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9._-]+$",
        description="The `x-request-id` the call was answered with (an async call's job id)",
    )
    score: float | None = Field(default=None, ge=-1e9, le=1e9, allow_inf_nan=False)
    label: str | None = Field(default=None, min_length=1, max_length=100)

    @model_validator(mode="after")
    def _something(self) -> FeedbackCreate:
        if self.score is None and self.label is None:
            raise ValueError("give a score, a label, or both")
        return self


class FeedbackRead(BaseModel):
    object: Literal["experiment.feedback"] = "experiment.feedback"
    request_id: str
    experiment_id: str
    variant_id: str
    score: float | None
    label: str | None


# ---- results ----------------------------------------------------------------------------------


class RateRead(BaseModel):
    """A proportion with its Wilson 95 % interval."""

    count: int
    rate: float | None
    ci_low: float | None
    ci_high: float | None


class MeanRead(BaseModel):
    """A mean over the records that have the value, with its 95 % t interval (exact: from
    sums of the values). The percentiles of latencies come from a DDSketch: each is within
    1 % of the value of rank floor(q·(n - 1)) among the n values."""

    n: int
    mean: float | None
    sd: float | None
    ci_low: float | None
    ci_high: float | None
    min: float | None
    max: float | None
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None


class VariantResult(BaseModel):
    variant_id: str
    name: str
    control: bool
    allocation: float
    n: int
    units: int
    success: RateRead
    metrics: dict[str, MeanRead]
    feedback_labels: dict[str, int]


class Comparison(BaseModel):
    """One variant against control on one metric."""

    variant_id: str
    metric: Metric
    test: Literal["welch_t", "two_proportion_z", "paired_t", "mcnemar_exact"] = Field(
        description="Live: Welch's t (means), the pooled two-proportion z (success rate). A "
        "batch, where each item ran through both sides: the paired t-test of the per-item "
        "differences and McNemar's exact test of paired success"
    )
    pairs: int | None = Field(
        default=None, description="Items compared on both sides (paired tests only)"
    )
    statistic: float | None
    df: float | None
    p_value: float | None
    p_adjusted: float | None = Field(description="Holm-adjusted over every comparison made")
    difference: float | None = Field(description="variant minus control")
    ci_low: float | None
    ci_high: float | None
    relative_difference: float | None
    significant: bool
    verdict: Literal["better", "worse", "no_difference", "not_tested"]
    note: str | None = None


class SampleRatio(BaseModel):
    """The χ² test of the units each variant got against its allocation."""

    chi2: float
    df: int
    p_value: float
    mismatch: bool = Field(description="p below 0.001: the split is not what was configured")
    observed: dict[str, int]
    expected: dict[str, float]
    note: str | None = None


class ResultsRead(BaseModel):
    object: Literal["experiment.results"] = "experiment.results"
    experiment_id: str
    status: ExperimentStatus
    source: RecordSource
    operation_id: str | None
    primary_metric: Metric
    minimum_effect: float
    alpha: float
    total: int
    variants: list[VariantResult]
    comparisons: list[Comparison]
    sample_ratio: SampleRatio | None
    winner: str | None
    recommendation: str


# ---- batches ----------------------------------------------------------------------------------


class BatchCreate(BaseModel):
    """Run every item of a dataset through every variant, as a job."""

    model_config = ConfigDict(extra="forbid")

    dataset_id: str = Field(min_length=1, max_length=64)
    dataset_version: int | None = Field(
        default=None, ge=1, description="The version of the dataset to run (default: current)"
    )
    concurrency: int = Field(
        default=4,
        ge=1,
        le=64,
        description="Items in flight at once (each runs through the variants one after another)",
    )
    model: ModelName | None = Field(
        default=None,
        description="The model a prompt experiment's items are sent to (a model experiment "
        "uses its target)",
    )


class BatchAccepted(BaseModel):
    operation_id: str
    status: str
    total: Annotated[int, Field(description="items x variants")]

"""Test cases, suites, runs and results as the admin API accepts and shows them."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

from app.core.ids import SLUG_MAX, is_slug
from app.core.schemas import ListPage, PartialUpdate, from_entity
from app.evals.entities import CaseOutcome, RunStatus, TestCase, TestCaseResult, TestType
from app.gateway.schemas import MAX_TOKENS, ModelName
from app.prompts.schemas import LABEL_PATTERN, VariableValue

MAX_TEXT = 200_000
MAX_ASSERTIONS = 100
MAX_SUITE_CASES = 10_000
MAX_CONCURRENCY = 64

Label = Annotated[str, Field(min_length=1, max_length=100)]
Unit = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]


def _slug(value: str) -> str:
    if not is_slug(value):
        raise ValueError(
            f"must be 1 to {SLUG_MAX} letters, digits and inner hyphens (e.g. 'greets-by-name')"
        )
    return value


# ---- targets: what a case calls -----------------------------------------------------------------


class ModelTarget(BaseModel):
    """A model of the registry, called with the case's messages."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["model"]
    model: ModelName


class ChainTarget(BaseModel):
    """A chain of models (fallbacks), called as one model."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["chain"]
    chain: ModelName


class PromptTarget(BaseModel):
    """A stored prompt at a version (a number, a label, or `production` else the newest),
    rendered with the case's variables and sent to `model` (a model or chain)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["prompt"]
    prompt_id: str = Field(min_length=1, max_length=64)
    version: int | None = Field(default=None, ge=1)
    label: str | None = Field(default=None, pattern=LABEL_PATTERN)
    model: ModelName

    @model_validator(mode="after")
    def _one_selector(self) -> Self:
        if self.version is not None and self.label is not None:
            raise ValueError("give either version or label, not both")
        return self


class WorkflowTarget(BaseModel):
    """A workflow, run with the case's input."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["workflow"]
    workflow_id: str = Field(min_length=1, max_length=64)


Target = Annotated[
    ModelTarget | ChainTarget | PromptTarget | WorkflowTarget, Field(discriminator="type")
]


# ---- test cases --------------------------------------------------------------------------------


class ModelPromptInput(BaseModel):
    """What a model, chain or prompt target is sent: the user's message (and a system message,
    unless a prompt target provides it), the prompt's variables, sampling settings."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["model_prompt"] = "model_prompt"
    user_message: str | None = Field(default=None, min_length=1, max_length=MAX_TEXT)
    system_message: str | None = Field(default=None, min_length=1, max_length=MAX_TEXT)
    variables: dict[str, VariableValue] = Field(default_factory=dict)
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)


class WorkflowInput(BaseModel):
    """What a workflow target is given."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["workflow"]
    input: dict[str, Any] = Field(default_factory=dict)


def _input_type(value: Any) -> str:
    """The input's type; a model input may leave it out."""
    given = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return str(given or "model_prompt")


CaseInput = Annotated[
    Annotated[ModelPromptInput, Tag("model_prompt")] | Annotated[WorkflowInput, Tag("workflow")],
    Discriminator(_input_type),
]


class AssertionSpec(BaseModel):
    """One assertion, in promptfoo's terms: `type` (`not-` for its inverse) and what it needs.

    `value`: the expected text, list, JSON, schema or rubric; `threshold`: the least score
    (`similar`, `rouge-n`, `llm-rubric`) or the most distance, milliseconds or dollars
    (`levenshtein`, `latency`, `cost`); `weight`: its share of the case's score; `provider`:
    the model that grades (model-graded) or embeds (`similar`); `path`: `json-path`'s JSONPath.
    """

    model_config = ConfigDict(extra="forbid")

    type: str = Field(min_length=1, max_length=64)
    value: Any = None
    threshold: float | None = Field(default=None, allow_inf_nan=False)
    weight: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    metric: str | None = Field(default=None, min_length=1, max_length=100)
    provider: ModelName | None = None
    path: str | None = Field(default=None, min_length=1, max_length=2000)

    def stored(self) -> dict[str, Any]:
        """The assertion as kept: what was given, defaults left out."""
        return self.model_dump(exclude_none=True, exclude_defaults=True) | {"type": self.type}


class TestCaseCreate(BaseModel):
    """A new test case: what is sent, to what (or the suite's default target), and what the
    output must satisfy."""

    __test__ = False
    model_config = ConfigDict(extra="forbid")

    id: str
    name: str | None = Field(default=None, min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=2000)
    input: CaseInput = Field(default_factory=ModelPromptInput)
    target: Target | None = None
    assertions: list[AssertionSpec] = Field(default_factory=list, max_length=MAX_ASSERTIONS)
    threshold: Unit | None = Field(
        default=None, description="Pass on this weighted score instead of every assertion"
    )
    tags: list[Label] = Field(default_factory=list, max_length=50)
    enabled: bool = True

    _id = field_validator("id")(_slug)


class TestCaseUpdate(PartialUpdate):
    """Changes to a test case; `assertions` replaces the whole list."""

    __test__ = False
    clearable = frozenset({"description", "target", "threshold"})

    name: str | None = Field(default=None, min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=2000)
    input: CaseInput | None = None
    target: Target | None = None
    assertions: list[AssertionSpec] | None = Field(default=None, max_length=MAX_ASSERTIONS)
    threshold: Unit | None = None
    tags: list[Label] | None = Field(default=None, max_length=50)
    enabled: bool | None = None


class TestCaseRead(BaseModel):
    __test__ = False

    id: str
    object: Literal["test_case"] = "test_case"
    name: str
    description: str | None
    test_type: TestType
    input: dict[str, Any]
    target: dict[str, Any] | None
    assertions: list[dict[str, Any]]
    threshold: float | None
    tags: list[str]
    enabled: bool
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, case: TestCase) -> TestCaseRead:
        return from_entity(cls, case)


class TestCaseList(ListPage[TestCaseRead]):
    __test__ = False


# ---- suites ------------------------------------------------------------------------------------


class TestSuiteCreate(BaseModel):
    """A set of test cases, what they run against unless a case says otherwise, and the share
    of cases a run must pass."""

    __test__ = False
    model_config = ConfigDict(extra="forbid")

    id: str
    name: str | None = Field(default=None, min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=2000)
    case_ids: list[str] = Field(default_factory=list, max_length=MAX_SUITE_CASES)
    default_target: Target | None = None
    judge_model: ModelName | None = None
    embedding_model: ModelName | None = None
    pass_threshold: Unit = Field(default=1.0, description="The share of cases that must pass")
    case_threshold: Unit | None = Field(
        default=None, description="The score that passes a case that has no threshold"
    )
    concurrency: int = Field(default=4, ge=1, le=MAX_CONCURRENCY)
    tags: list[Label] = Field(default_factory=list, max_length=50)

    _id = field_validator("id")(_slug)


class TestSuiteUpdate(PartialUpdate):
    """Changes to a suite; `case_ids` replaces the whole set."""

    __test__ = False
    clearable = frozenset(
        {"description", "default_target", "judge_model", "embedding_model", "case_threshold"}
    )

    name: str | None = Field(default=None, min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=2000)
    case_ids: list[str] | None = Field(default=None, max_length=MAX_SUITE_CASES)
    default_target: Target | None = None
    judge_model: ModelName | None = None
    embedding_model: ModelName | None = None
    pass_threshold: Unit | None = None
    case_threshold: Unit | None = None
    concurrency: int | None = Field(default=None, ge=1, le=MAX_CONCURRENCY)
    tags: list[Label] | None = Field(default=None, max_length=50)


class TestSuiteRead(BaseModel):
    __test__ = False

    id: str
    object: Literal["test_suite"] = "test_suite"
    name: str
    description: str | None
    case_ids: list[str]
    default_target: dict[str, Any] | None
    judge_model: str | None
    embedding_model: str | None
    pass_threshold: float
    case_threshold: float | None
    concurrency: int
    tags: list[str]
    created_at: datetime
    updated_at: datetime


class TestSuiteList(ListPage[TestSuiteRead]):
    __test__ = False


# ---- runs and results --------------------------------------------------------------------------


class RunCreate(BaseModel):
    """A run: of every enabled case of the suite, or of some (`case_ids`), or of those that
    did not pass in an earlier run (`failed_from`); `target` replaces every case's target."""

    model_config = ConfigDict(extra="forbid")

    target: Target | None = None
    judge_model: ModelName | None = None
    embedding_model: ModelName | None = None
    concurrency: int | None = Field(default=None, ge=1, le=MAX_CONCURRENCY)
    case_ids: list[str] | None = Field(default=None, min_length=1, max_length=MAX_SUITE_CASES)
    failed_from: str | None = Field(
        default=None, description="A run of this suite: run again the cases it did not pass"
    )


class CaseRunCreate(BaseModel):
    """A run of one test case, with its target unless `target` replaces it."""

    model_config = ConfigDict(extra="forbid")

    target: Target | None = None
    judge_model: ModelName | None = None
    embedding_model: ModelName | None = None


class RunAccepted(BaseModel):
    """A run accepted: its job is committed and will be executed by a worker."""

    id: str
    object: Literal["test_run"] = "test_run"
    operation_id: str
    status: RunStatus


class RunProgress(BaseModel):
    total: int
    done: int
    passed: int
    failed: int
    errored: int


class RunRead(BaseModel):
    """A run and how far it is; `passed` (the CI gate) is set once it completed: whether the
    share of cases that passed reached the pass threshold."""

    id: str
    object: Literal["test_run"] = "test_run"
    suite_id: str | None
    test_case_id: str | None
    operation_id: str | None
    status: RunStatus
    progress: RunProgress
    passed: bool | None
    pass_rate: float | None
    pass_threshold: float
    score: float | None
    settings: dict[str, Any]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class RunList(ListPage[RunRead]):
    pass


class CaseResultRead(BaseModel):
    """One case's result in one run: the output, every assertion's verdict, and the call's
    latency, tokens and cost."""

    id: str
    object: Literal["test_case_result"] = "test_case_result"
    test_case_id: str
    run_id: str
    operation_id: str | None
    outcome: CaseOutcome
    passed: bool
    score: float | None
    output: str | None
    output_json: Any
    assertion_results: list[dict[str, Any]]
    model: str | None
    execution_time_ms: int
    tokens_used: int | None
    cost_usd: float | None
    error: str | None
    created_at: datetime

    @classmethod
    def of(cls, result: TestCaseResult) -> CaseResultRead:
        cost = None if result.cost_micros is None else result.cost_micros / 1_000_000
        return from_entity(cls, result, cost_usd=cost)


class CaseResultList(ListPage[CaseResultRead]):
    pass


class CaseSide(BaseModel):
    outcome: CaseOutcome
    score: float | None


class CaseChange(BaseModel):
    """A case in both runs whose outcome changed."""

    test_case_id: str
    name: str
    baseline: CaseSide
    current: CaseSide


class RunComparison(BaseModel):
    """What changed from a baseline run to this one: cases that stopped passing
    (`regressions`), cases that started passing (`improvements`), and the rest."""

    object: Literal["test_run.comparison"] = "test_run.comparison"
    run_id: str
    baseline_id: str
    regressions: list[CaseChange]
    improvements: list[CaseChange]
    unchanged: int
    only_in_run: list[str]
    only_in_baseline: list[str]

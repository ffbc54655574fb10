"""Step definitions: what each step type takes, parsed from a workflow's stored `steps`.

Field names follow the original system's (`model_id`, `prompt_id`, `prompt_variables`,
`knowledge_base_id`, `external_api_id`, `on_error`...); a parse error names the field as
`steps[2].model_id` (nested: `steps[1].branches.a[0].query`, `steps[3].steps[0].value`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from app.core.errors import InvalidInput

STEP_NAME = r"^[A-Za-z0-9_-]{1,50}$"
MAX_STEPS = 100  # in one sequence (a workflow, a branch or a map's steps): the visit cap
MAX_MAP_CONCURRENCY = 32

StepName = Annotated[str, Field(pattern=STEP_NAME)]
# An id written as it is: references are not allowed where the id is checked on save.
LiteralId = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^$]*$")]
Operator = Literal[
    "eq",
    "ne",
    "gt",
    "gte",
    "lt",
    "lte",
    "is_empty",
    "is_not_empty",
    "contains",
    "starts_with",
    "ends_with",
]


class Retry(BaseModel):
    """How often a failing step is tried (all attempts, the first included), with backoff
    `backoff_ms·2^(n-1)` capped at `max_backoff_ms`; only transient failures, timeouts and an
    output that breaks `output_schema` are tried again."""

    model_config = ConfigDict(extra="forbid")

    attempts: int = Field(default=1, ge=1, le=10)
    backoff_ms: int = Field(default=200, ge=0, le=60_000)
    max_backoff_ms: int = Field(default=10_000, ge=0, le=300_000)

    def delay(self, failed: int) -> float:
        """Seconds to wait after the `failed`-th attempt failed."""
        delay_ms: int = min(self.backoff_ms * 2 ** (failed - 1), self.max_backoff_ms)
        return delay_ms / 1000


NO_RETRY = Retry()


class StepBase(BaseModel):
    """What every step has: its name and how its failures, time and output are handled."""

    model_config = ConfigDict(extra="forbid")

    name: StepName
    description: str | None = Field(default=None, max_length=2000)
    # `fail` ends the run; `skip` goes on with no output; `default` goes on with `default`.
    # The original's `fail_workflow` and `skip_step` are read as `fail` and `skip`.
    on_error: Literal["fail", "skip", "default", "fail_workflow", "skip_step"] = "fail"
    default: Any = None
    retry: Retry | None = None
    timeout_ms: int | None = Field(default=None, ge=1, le=3_600_000)
    output_schema: dict[str, Any] | None = None

    @property
    def failure_policy(self) -> str:
        return {"fail_workflow": "fail", "skip_step": "skip"}.get(self.on_error, self.on_error)


class ChatCompletionStep(StepBase):
    """A chat completion through the gateway: a stored prompt (rendered with its variables, as
    a `user` message), and/or messages written here."""

    type: Literal["chat_completion"]
    model_id: LiteralId
    prompt_id: LiteralId | None = None
    prompt_label: str | None = Field(default=None, max_length=50)
    prompt_version: int | None = Field(default=None, ge=1)
    prompt_variables: dict[str, Any] = Field(default_factory=dict)
    system_message: str | None = None
    messages: list[dict[str, Any]] | None = Field(default=None, max_length=256)
    user_message: str | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    top_p: float | None = Field(default=None, ge=0, le=1)
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _something_to_send(self) -> ChatCompletionStep:
        if self.prompt_id is None and self.user_message is None and not self.messages:
            raise ValueError("give prompt_id, user_message or messages")
        return self


class KnowledgeBaseSearchStep(StepBase):
    """The chunks of a knowledge base nearest to a query."""

    type: Literal["knowledge_base_search"]
    knowledge_base_id: LiteralId
    query: str = Field(min_length=1)
    top_k: int = Field(default=10, ge=1, le=100)
    similarity_threshold: float | None = Field(default=None, ge=0, le=1)
    filter: dict[str, Any] | None = None


class CragScoringStep(StepBase):
    """Documents graded for relevance to a query by a judge model; the relevant ones kept."""

    type: Literal["crag_scoring"]
    model_id: LiteralId
    query: str = Field(min_length=1)
    # A reference to the documents, usually a search step's (`${step:search:documents}`).
    documents_source: str = Field(pattern=r"\$\{")
    threshold: float = Field(default=0.5, ge=0, le=1)
    # Further thresholds the grading understands (e.g. `upper`, `lower`), passed as given.
    thresholds: dict[str, float] | None = None


class GoToStep(BaseModel):
    model_config = ConfigDict(extra="forbid")

    go_to_step: StepName


class EndWorkflow(BaseModel):
    model_config = ConfigDict(extra="forbid")

    end_workflow: Any


Action = Literal["continue"] | GoToStep | EndWorkflow


class Condition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    field: str = Field(min_length=1)
    operator: Operator
    value: Any = None
    action: Action


class ConditionalStep(StepBase):
    """The first condition that holds decides: go on, go to a step of the same sequence, or
    end the sequence (the workflow, at the top) with a value."""

    type: Literal["conditional"]
    conditions: list[Condition] = Field(min_length=1, max_length=100)
    default_action: Action = "continue"


class HttpRequestStep(StepBase):
    """A request to an external API (its base URL, headers and credential) through the
    SSRF-guarded client; `timeout_ms` (default 30 s) bounds each attempt."""

    type: Literal["http_request"]
    external_api_id: LiteralId
    # Overrides the external API's own credential.
    credential_id: LiteralId | None = None
    path: str = Field(default="", max_length=4000)
    method: Literal["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"] = "GET"
    headers: dict[str, str] = Field(default_factory=dict)
    query: dict[str, Any] = Field(default_factory=dict)
    body: Any = None
    fail_on_error: bool = True
    follow_redirects: bool = False
    # `$.a.b[0]`, `$.items[*].id`: the part of a JSON answer to put in `extracted`.
    extract_path: str | None = Field(default=None, max_length=500)


class TransformStep(StepBase):
    """A value built from references: `value` with every reference in it resolved."""

    type: Literal["transform"]
    value: Any


class ParallelStep(StepBase):
    """Named branches of steps, run concurrently; the output maps each branch to the output of
    its last step."""

    type: Literal["parallel"]
    branches: dict[StepName, list[Step]] = Field(min_length=1, max_length=32)


class MapStep(StepBase):
    """Steps run over each item of a list (`${item:path}` inside them), at most `concurrency`
    items at once; the output lists each item's last output, in order."""

    type: Literal["map"]
    items: str = Field(pattern=r"\$\{")
    steps: list[Step] = Field(min_length=1, max_length=MAX_STEPS)
    concurrency: int = Field(default=4, ge=1, le=MAX_MAP_CONCURRENCY)
    max_items: int = Field(default=1000, ge=1, le=10_000)


Step = Annotated[
    ChatCompletionStep
    | KnowledgeBaseSearchStep
    | CragScoringStep
    | ConditionalStep
    | HttpRequestStep
    | TransformStep
    | ParallelStep
    | MapStep,
    Field(discriminator="type"),
]
STEP_TYPES = (
    "chat_completion",
    "knowledge_base_search",
    "crag_scoring",
    "conditional",
    "http_request",
    "transform",
    "parallel",
    "map",
)
ParallelStep.model_rebuild()
MapStep.model_rebuild()

_STEPS: TypeAdapter[list[Step]] = TypeAdapter(list[Step])


def param_of(loc: Sequence[int | str], root: str = "steps") -> str:
    """A pydantic error location in the steps as a field name: `steps[2].model_id`.

    The union's tag (the step's type) that pydantic puts after each step's index is left out.
    """
    out = root
    previous_was_index = False
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            previous_was_index = True
            continue
        if previous_was_index and part in STEP_TYPES:
            previous_was_index = False
            continue
        out += f".{part}"
        previous_was_index = False
    return out


def parse_steps(raw: Any) -> list[Step]:
    """The steps of a definition, or `InvalidInput` naming the first field that is wrong."""
    if not isinstance(raw, list) or not raw:
        raise InvalidInput("a workflow needs at least one step", param="steps")
    if len(raw) > MAX_STEPS:
        raise InvalidInput(f"a workflow has at most {MAX_STEPS} steps", param="steps")
    try:
        return _STEPS.validate_python(raw)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        loc = list(error["loc"])
        if error["type"] in ("union_tag_not_found", "union_tag_invalid"):
            loc.append("type")
            message = f"type must be one of {', '.join(STEP_TYPES)}"
        else:
            message = error["msg"]
        param = param_of(loc)
        raise InvalidInput(f"{param}: {message}", param=param) from None

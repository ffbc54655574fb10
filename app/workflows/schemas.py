"""Workflows, their versions, external APIs and runs as the API accepts and shows them."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.core.ids import SLUG_MAX, is_slug
from app.core.schemas import ListPage, PartialUpdate, from_entity
from app.workflows.definition import MAX_STEPS
from app.workflows.entities import ExternalApi, Workflow, WorkflowStepRun, WorkflowVersion

StepList = Annotated[list[dict[str, Any]], Field(min_length=1, max_length=MAX_STEPS)]
HeaderName = Annotated[
    str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
]
Headers = Annotated[dict[HeaderName, Annotated[str, Field(max_length=4000)]], Field(max_length=50)]


def _slug(value: str) -> str:
    if not is_slug(value):
        raise ValueError(
            f"must be 1 to {SLUG_MAX} letters, digits and inner hyphens (e.g. 'support-triage')"
        )
    return value


class WorkflowCreate(BaseModel):
    """A new workflow; its definition becomes version 1."""

    model_config = ConfigDict(extra="forbid")

    id: str
    name: str = Field(min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=2000)
    # JSON Schema the run's `input` must match.
    input_schema: dict[str, Any] | None = None
    steps: StepList
    enabled: bool = True

    _id = field_validator("id")(_slug)


class WorkflowUpdate(PartialUpdate):
    """Changes to a workflow; new steps or a new input schema become a new version."""

    clearable = frozenset({"description", "input_schema"})

    name: str | None = Field(default=None, min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=2000)
    input_schema: dict[str, Any] | None = None
    steps: StepList | None = None
    enabled: bool | None = None


class WorkflowClone(BaseModel):
    model_config = ConfigDict(extra="forbid")

    new_id: str
    new_name: str | None = Field(default=None, min_length=1, max_length=200)

    _id = field_validator("new_id")(_slug)


class WorkflowRead(BaseModel):
    """A workflow at its current version."""

    id: str
    object: Literal["workflow"] = "workflow"
    name: str
    description: str | None
    input_schema: dict[str, Any] | None
    steps: list[dict[str, Any]]
    version: int
    enabled: bool
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, workflow: Workflow) -> WorkflowRead:
        return from_entity(cls, workflow, version=workflow.workflow_version)


class WorkflowList(ListPage[WorkflowRead]):
    pass


class WorkflowVersionRead(BaseModel):
    """One kept version of a workflow's definition."""

    workflow_id: str
    object: Literal["workflow.version"] = "workflow.version"
    version: int
    input_schema: dict[str, Any] | None
    steps: list[dict[str, Any]]
    created_at: datetime

    @classmethod
    def of(cls, kept: WorkflowVersion) -> WorkflowVersionRead:
        return from_entity(cls, kept, version=kept.workflow_version)


class WorkflowVersionList(ListPage[WorkflowVersionRead]):
    pass


class ExternalApiCreate(BaseModel):
    """An HTTP API `http_request` steps may call; its base URL is checked like every URL the
    gateway calls (no private or loopback address outside OUTBOUND_ALLOWED_HOSTS)."""

    model_config = ConfigDict(extra="forbid")

    id: str
    name: str = Field(min_length=1, max_length=128)
    description: str | None = Field(default=None, max_length=2000)
    base_url: str = Field(min_length=1, max_length=2000)
    # Sent with every request; secrets belong in the credential, not here.
    base_headers: Headers = Field(default_factory=dict)
    # An `http_api_key` or `custom` credential whose secret goes in a header.
    credential_id: str | None = Field(default=None, max_length=64)
    enabled: bool = True

    _id = field_validator("id")(_slug)


class ExternalApiUpdate(PartialUpdate):
    clearable = frozenset({"description", "credential_id"})

    name: str | None = Field(default=None, min_length=1, max_length=128)
    description: str | None = Field(default=None, max_length=2000)
    base_url: str | None = Field(default=None, min_length=1, max_length=2000)
    base_headers: Headers | None = None
    credential_id: str | None = Field(default=None, max_length=64)
    enabled: bool | None = None


class ExternalApiRead(BaseModel):
    id: str
    object: Literal["external_api"] = "external_api"
    name: str
    description: str | None
    base_url: str
    base_headers: dict[str, str]
    credential_id: str | None
    enabled: bool
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, api: ExternalApi) -> ExternalApiRead:
        return from_entity(cls, api)


class ExternalApiList(ListPage[ExternalApiRead]):
    pass


class ExecuteRequest(BaseModel):
    """A run's input, checked against the workflow's `input_schema`."""

    model_config = ConfigDict(extra="forbid")

    input: Any = None


class TestRequest(BaseModel):
    """A dry run: the input, outputs to use instead of running some steps (by step name), and
    whether the steps without one are skipped rather than run."""

    model_config = ConfigDict(extra="forbid")

    input: Any = None
    step_mocks: dict[str, Any] = Field(default_factory=dict, max_length=500)
    mock_all: bool = False


class StepRunRead(BaseModel):
    """One step of a run as it ended: what it was run with, what it gave, and what it cost."""

    object: Literal["workflow.step"] = "workflow.step"
    name: str
    path: str
    type: str
    status: str
    attempts: int
    input: Any
    output: Any
    error: dict[str, Any] | None
    prompt_tokens: int
    completion_tokens: int
    cost_micros: int
    started_at: datetime | None
    finished_at: datetime | None
    duration_ms: int

    @classmethod
    def of(cls, record: WorkflowStepRun) -> StepRunRead:
        return from_entity(
            cls,
            record,
            name=record.step_name,
            path=record.step_path,
            type=record.step_type,
            status=record.status.value,
        )


class StepRunList(BaseModel):
    object: Literal["list"] = "list"
    operation_id: str
    data: list[StepRunRead]


class RunRead(BaseModel):
    """A finished run: its output, or the error that ended it, and a summary of every step."""

    operation_id: str
    object: Literal["workflow.run"] = "workflow.run"
    status: str
    success: bool
    workflow_id: str
    workflow_version: int
    output: Any = None
    error: dict[str, Any] | None = None
    steps: list[dict[str, Any]]
    usage: dict[str, int]


class RunAccepted(BaseModel):
    """A run accepted as a job (or still running when the synchronous wait ended)."""

    operation_id: str
    object: Literal["operation"] = "operation"
    status: str


class TestRead(BaseModel):
    """A dry run's outcome: nothing of it was recorded, but the real steps' calls were made."""

    object: Literal["workflow.test"] = "workflow.test"
    workflow_id: str
    workflow_version: int
    success: bool
    output: Any = None
    error: dict[str, Any] | None = None
    steps: list[StepRunRead]

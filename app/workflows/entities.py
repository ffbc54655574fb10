"""The workflow tables: workflows and their versions, the external HTTP APIs their steps call,
and the record of every step a run finished (its checkpoint)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa

from app.storage.entity import (
    Entity,
    big,
    choice,
    instant,
    json_list,
    json_object,
    json_value,
    pk,
    reference,
    text,
)


class Workflow(Entity, table=True):
    """A named sequence of steps (chat calls, searches, conditions, HTTP requests)."""

    __tablename__ = "workflows"

    id: str = pk()
    name: str = text(max_length=200)
    description: str | None = text(None)
    input_schema: Any = json_value()
    steps: list[dict[str, Any]] = json_list()
    # Incremented whenever the steps change, so a run records which definition it followed.
    workflow_version: int = 1
    enabled: bool = True


class WorkflowVersion(Entity, table=True):
    """The definition of one version of a workflow, kept so a run follows the one it started."""

    __tablename__ = "workflow_versions"
    __table_args__ = (
        sa.UniqueConstraint(
            "workflow_id",
            "workflow_version",
            name="uq_workflow_versions_workflow_id_workflow_version",
        ),
    )

    id: str = pk()
    # The unique key leads with workflow_id, so it serves lookups by workflow as well.
    workflow_id: str = reference("workflows.id", index=False)
    workflow_version: int
    input_schema: Any = json_value()
    steps: list[dict[str, Any]] = json_list()


class ExternalApi(Entity, table=True):
    """An HTTP API workflow steps may call: its base URL, fixed headers and credential."""

    __tablename__ = "external_apis"

    id: str = pk()
    name: str = text(max_length=200)
    description: str | None = text(None)
    base_url: str = text()
    # Non-secret headers only; a secret header comes from the credential.
    base_headers: dict[str, str] = json_object()
    credential_id: str | None = reference("credentials.id", on_delete="RESTRICT", nullable=True)
    enabled: bool = True


class StepStatus(StrEnum):
    COMPLETED = "completed"
    SKIPPED = "skipped"  # failed, and its `on_error` said to go on without an output
    DEFAULTED = "defaulted"  # failed, and its `on_error` gave the output to go on with
    FAILED = "failed"


# What a re-run reuses: a step in one of these states is never executed again.
FINISHED = frozenset({StepStatus.COMPLETED, StepStatus.SKIPPED, StepStatus.DEFAULTED})


class WorkflowStepRun(Entity, table=True):
    """One step of one run as it ended: the checkpoint a re-run of the job starts from.

    Written in the transaction that records the run's progress, while the job's lease holds; its
    id is derived from the run and the step's path, so a step is recorded once per run.
    """

    __tablename__ = "workflow_step_runs"
    __table_args__ = (
        sa.Index("ix_workflow_step_runs_operation_id_position", "operation_id", "position"),
    )

    id: str = pk()
    # Deleted with the run's operation (retention).
    operation_id: str = reference("operations.id", index=False)
    # Where the step sits: `name`, `name#2` on a second visit, `par/branch/name`, `map[3]/name`.
    step_path: str = text(max_length=1000)
    step_name: str = text(max_length=64)
    step_type: str = text(max_length=32)
    # The order in which the run's steps were recorded.
    position: int = 0
    status: StepStatus = choice(StepStatus)
    attempts: int = 0
    input: Any = json_value()
    output: Any = json_value()
    error: dict[str, Any] | None = json_value()
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_micros: int = big(0)
    started_at: datetime | None = instant()
    finished_at: datetime | None = instant()
    duration_ms: int = 0

"""Workflows as the target of a test case: run to their end inside the evaluation's own job."""

from __future__ import annotations

from typing import Any

from app.core.errors import NotFound
from app.gateway.calls import CallContext, Caller
from app.storage.protocol import Storage
from app.storage.reads import read_existing
from app.workflows.engine import WorkflowEngine
from app.workflows.entities import Workflow
from app.workflows.schema_check import check_value


class WorkflowCases:
    """Runs a workflow's current version for a caller, its steps unrecorded: the evaluation job
    that asks keeps the outcome as its case result, and a resumed evaluation runs the case again.
    Its calls are made in the evaluation's context (`CallSource.EVALUATION`, the case's job and
    its ledger, no response cache)."""

    def __init__(self, storage: Storage, engine: WorkflowEngine) -> None:
        self._storage = storage
        self._engine = engine

    async def check(self, workflow_id: str) -> None:
        """`NotFound` unless `workflow_id` names an enabled workflow."""
        workflow = await read_existing(self._storage, Workflow, workflow_id, "workflow")
        if not workflow.enabled:
            raise NotFound("workflow", workflow_id)

    async def run(
        self,
        caller: Caller,
        workflow_id: str,
        input: dict[str, Any],
        *,
        context: CallContext,
    ) -> Any:
        """The workflow's output for `input`, its calls made in `context` (the evaluation's);
        the error that ended it, raised."""
        workflow = await read_existing(self._storage, Workflow, workflow_id, "workflow")
        if not workflow.enabled:
            raise NotFound("workflow", workflow_id)
        if workflow.input_schema is not None:
            check_value(workflow.input_schema, input, param="input")
        output, _, error = await self._engine.dry_run(
            caller, workflow.steps, input, mocks={}, mock_all=False, context=context
        )
        if error is not None:
            raise error
        return output

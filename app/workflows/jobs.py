"""The workflows' job handler: a `workflow_run` job is one run of the engine."""

from __future__ import annotations

from app.operations.runner import Handler
from app.queue.names import OperationKind
from app.workflows.engine import WorkflowEngine


def workflow_handlers(engine: WorkflowEngine) -> dict[OperationKind, Handler]:
    """What a worker (or the API, for a synchronous run) runs for `workflow_run` jobs."""
    return {OperationKind.WORKFLOW_RUN: engine.run}

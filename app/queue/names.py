"""Queue and actor names, in one place: one queue per job kind so pools can be dedicated."""

from __future__ import annotations

from app.operations.entities import OperationKind

QUEUES: dict[OperationKind, str] = {
    OperationKind.CHAT_COMPLETION: "chat",
    OperationKind.WORKFLOW_RUN: "workflows",
    OperationKind.EXPERIMENT_BATCH: "experiments",
    OperationKind.TEST_CASE_RUN: "evals",
    OperationKind.WEBHOOK_DELIVERY: "webhooks",
}

ACTORS: dict[OperationKind, str] = {
    OperationKind.CHAT_COMPLETION: "chat.complete",
    OperationKind.WORKFLOW_RUN: "workflows.run",
    OperationKind.EXPERIMENT_BATCH: "experiments.run_batch",
    OperationKind.TEST_CASE_RUN: "evals.run_tests",
    OperationKind.WEBHOOK_DELIVERY: "webhooks.deliver",
}

ALL_QUEUES: tuple[str, ...] = tuple(QUEUES.values())

"""The kinds of job, and their queue and actor names, in one place: one queue per job kind so
pools can be dedicated."""

from __future__ import annotations

from enum import StrEnum


class OperationKind(StrEnum):
    """What a job does; every kind but `BATCH` (a parent that only waits) has its own queue."""

    CHAT_COMPLETION = "chat_completion"
    WORKFLOW_RUN = "workflow_run"
    EXPERIMENT_BATCH = "experiment_batch"
    TEST_CASE_RUN = "test_case_run"
    WEBHOOK_DELIVERY = "webhook_delivery"
    BATCH = "batch"  # an OpenAI-style batch: a parent whose children do the work
    EMBEDDING = "embedding"  # one embeddings call (a line of an embeddings batch)
    KNOWLEDGE_INGESTION = "knowledge_ingestion"  # parse, chunk and embed one document


QUEUES: dict[OperationKind, str] = {
    OperationKind.CHAT_COMPLETION: "chat",
    OperationKind.WORKFLOW_RUN: "workflows",
    OperationKind.EXPERIMENT_BATCH: "experiments",
    OperationKind.TEST_CASE_RUN: "evals",
    OperationKind.WEBHOOK_DELIVERY: "webhooks",
    OperationKind.EMBEDDING: "embeddings",
    OperationKind.KNOWLEDGE_INGESTION: "knowledge",
}

ACTORS: dict[OperationKind, str] = {
    OperationKind.CHAT_COMPLETION: "chat.complete",
    OperationKind.WORKFLOW_RUN: "workflows.run",
    OperationKind.EXPERIMENT_BATCH: "experiments.run_batch",
    OperationKind.TEST_CASE_RUN: "evals.run_tests",
    OperationKind.WEBHOOK_DELIVERY: "webhooks.deliver",
    OperationKind.EMBEDDING: "embeddings.create",
    OperationKind.KNOWLEDGE_INGESTION: "knowledge.ingest",
}

ALL_QUEUES: tuple[str, ...] = tuple(QUEUES.values())

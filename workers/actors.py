"""The actors: one per job kind, each on its kind's queue, each a thin call into the runner."""

from __future__ import annotations

from typing import Any

import dramatiq

from app.queue.names import ACTORS, QUEUES, USAGE_ACTOR, USAGE_QUEUE, OperationKind
from workers import runtime
from workers.broker import ensure_broker

ensure_broker()  # before any actor is declared, or Dramatiq would invent a default broker

# Retries are the job engine's (recorded on the job, bounded by its max attempts), not Dramatiq's.
TIME_LIMIT_MS = 3_600_000


@dramatiq.actor(
    actor_name=ACTORS[OperationKind.CHAT_COMPLETION],
    queue_name=QUEUES[OperationKind.CHAT_COMPLETION],
    max_retries=0,
    time_limit=TIME_LIMIT_MS,
)
async def complete_chat(operation_id: str) -> None:
    """Run one chat-completion job."""
    await runtime.get_runtime().runner.execute(operation_id)


@dramatiq.actor(
    actor_name=ACTORS[OperationKind.WORKFLOW_RUN],
    queue_name=QUEUES[OperationKind.WORKFLOW_RUN],
    max_retries=0,
    time_limit=TIME_LIMIT_MS,
)
async def run_workflow(operation_id: str) -> None:
    """Run one workflow job."""
    await runtime.get_runtime().runner.execute(operation_id)


@dramatiq.actor(
    actor_name=ACTORS[OperationKind.EXPERIMENT_BATCH],
    queue_name=QUEUES[OperationKind.EXPERIMENT_BATCH],
    max_retries=0,
    time_limit=TIME_LIMIT_MS,
)
async def run_experiment_batch(operation_id: str) -> None:
    """Run one experiment-batch job."""
    await runtime.get_runtime().runner.execute(operation_id)


@dramatiq.actor(
    actor_name=ACTORS[OperationKind.TEST_CASE_RUN],
    queue_name=QUEUES[OperationKind.TEST_CASE_RUN],
    max_retries=0,
    time_limit=TIME_LIMIT_MS,
)
async def run_tests(operation_id: str) -> None:
    """Run one test-case job."""
    await runtime.get_runtime().runner.execute(operation_id)


@dramatiq.actor(
    actor_name=ACTORS[OperationKind.WEBHOOK_DELIVERY],
    queue_name=QUEUES[OperationKind.WEBHOOK_DELIVERY],
    max_retries=0,
    time_limit=TIME_LIMIT_MS,
)
async def deliver_webhook(operation_id: str) -> None:
    """Run one webhook-delivery job."""
    await runtime.get_runtime().runner.execute(operation_id)


@dramatiq.actor(
    actor_name=ACTORS[OperationKind.EMBEDDING],
    queue_name=QUEUES[OperationKind.EMBEDDING],
    max_retries=0,
    time_limit=TIME_LIMIT_MS,
)
async def create_embeddings(operation_id: str) -> None:
    """Run one embeddings job."""
    await runtime.get_runtime().runner.execute(operation_id)


# No job row records a batch, so Dramatiq retries it; writing a batch twice is a no-op.
@dramatiq.actor(actor_name=USAGE_ACTOR, queue_name=USAGE_QUEUE, max_retries=20, min_backoff=1000)
async def record_usage_batch(batch: dict[str, Any]) -> None:
    """Insert one batch of usage records and execution logs."""
    await runtime.get_runtime().services.accounting.usage.write_batch(batch)


ALL = (
    complete_chat,
    run_workflow,
    run_experiment_batch,
    run_tests,
    deliver_webhook,
    create_embeddings,
    record_usage_batch,
)


def bind(broker: dramatiq.Broker) -> None:
    """Declare the actors on `broker` too (a runner or a test that built a new broker)."""
    for actor in ALL:
        actor.broker = broker
        broker.declare_actor(actor)

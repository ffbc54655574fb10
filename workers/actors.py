"""The actors: one job actor per kind, on its kind's queue, each the same thin call into the
runner."""

from __future__ import annotations

from typing import Any

import dramatiq

from app.queue.names import ACTORS, QUEUES, OperationKind
from workers import runtime
from workers.broker import ensure_broker

ensure_broker()  # before any actor is declared, or Dramatiq would invent a default broker

# Retries are the job engine's (recorded on the job, bounded by its max attempts), not Dramatiq's.
TIME_LIMIT_MS = 3_600_000


async def run_job(operation_id: str) -> None:
    """Run one job; the runner finds its kind, and so its handler, on the job's row."""
    await runtime.get_runtime().runner.execute(operation_id)


def declare_job_actor(kind: OperationKind) -> dramatiq.Actor[[str], None]:
    """The actor of `kind`'s jobs, named as `app.queue.names` says: the names travel in every
    message, so a message sent before a restart still finds its actor."""
    declare = dramatiq.actor(
        actor_name=ACTORS[kind], queue_name=QUEUES[kind], max_retries=0, time_limit=TIME_LIMIT_MS
    )
    return declare(run_job)


JOB_ACTORS: dict[OperationKind, dramatiq.Actor[[str], None]] = {
    kind: declare_job_actor(kind) for kind in QUEUES
}


ALL: tuple[dramatiq.Actor[Any, None], ...] = tuple(JOB_ACTORS.values())


def bind(broker: dramatiq.Broker) -> None:
    """Declare the actors on `broker` too (a runner or a test that built a new broker)."""
    for actor in ALL:
        actor.broker = broker
        broker.declare_actor(actor)

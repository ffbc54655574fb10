"""The experiments' job handler: an experiment batch runs a dataset through every variant."""

from __future__ import annotations

from app.experiments.batches import BatchRunner
from app.operations.runner import Handler, JobContext
from app.queue.names import OperationKind


def experiment_handlers(batches: BatchRunner) -> dict[OperationKind, Handler]:
    """What a worker runs for `experiment_batch` jobs."""

    async def experiment_batch(ctx: JobContext) -> object:
        return await batches.run(ctx)

    return {OperationKind.EXPERIMENT_BATCH: experiment_batch}

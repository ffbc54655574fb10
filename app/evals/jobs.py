"""The evaluations' job handler: a `test_case_run` job runs one case of a test run, or (the
run's parent job, after every case) sums the run up."""

from __future__ import annotations

from app.evals.execution import RunExecutor
from app.operations.runner import Handler, JobContext
from app.queue.names import OperationKind


def eval_handlers(executor: RunExecutor) -> dict[OperationKind, Handler]:
    """What a worker runs for test-run jobs."""

    async def test_case_run(ctx: JobContext) -> object:
        return await executor.execute(ctx)

    return {OperationKind.TEST_CASE_RUN: test_case_run}

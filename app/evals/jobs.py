"""The evaluations' job handler: one `test_case_run` job runs every case of one test run."""

from __future__ import annotations

from app.evals.execution import RunExecutor
from app.operations.runner import Handler, JobContext
from app.queue.names import OperationKind


def eval_handlers(executor: RunExecutor) -> dict[OperationKind, Handler]:
    """What a worker runs for test-run jobs."""

    async def test_case_run(ctx: JobContext) -> object:
        return await executor.execute(ctx)

    return {OperationKind.TEST_CASE_RUN: test_case_run}

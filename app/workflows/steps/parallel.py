"""`parallel`: named branches of steps run concurrently, joined; each branch step is recorded
(and so skipped by a re-run) on its own."""

from __future__ import annotations

from app.workflows.definition import ParallelStep
from app.workflows.steps.base import StepEnv, StepResult, run_all


async def execute(step: ParallelStep, env: StepEnv) -> StepResult:
    names = list(step.branches)
    ends = await run_all(
        [
            env.sequence(step.branches[name], env.scope.child(), f"{env.path}/{name}/")
            for name in names
        ]
    )
    return StepResult(output={name: end.output for name, end in zip(names, ends, strict=True)})

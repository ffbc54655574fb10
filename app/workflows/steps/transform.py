"""`transform`: a value built from references. No code runs: `value` is JSON whose strings may
hold references (app/workflows/references.py), each replaced by what it names."""

from __future__ import annotations

from app.workflows.definition import TransformStep
from app.workflows.steps.base import StepEnv, StepResult


async def execute(step: TransformStep, env: StepEnv) -> StepResult:
    return StepResult(output=env.resolve(step.value))

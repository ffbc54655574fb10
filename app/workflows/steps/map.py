"""`map`: a sequence of steps over each item of a list, at most `concurrency` items at once; each
item's steps are recorded (and so skipped by a re-run) on their own."""

from __future__ import annotations

import asyncio
from typing import Any

from app.core.errors import InvalidInput
from app.workflows.definition import MapStep
from app.workflows.steps.base import Ended, StepEnv, StepResult, run_all


async def execute(step: MapStep, env: StepEnv) -> StepResult:
    items: Any = env.resolve(step.items)
    if items is None:
        items = []
    if not isinstance(items, list):
        raise InvalidInput(f"items must name a list; {step.items} is a {type(items).__name__}")
    if len(items) > step.max_items:
        raise InvalidInput(f"items names {len(items)} items, more than max_items")
    gate = asyncio.Semaphore(step.concurrency)

    async def one(index: int, item: Any) -> Ended:
        async with gate:
            return await env.sequence(step.steps, env.scope.child(item), f"{env.path}[{index}]/")

    ends = await run_all([one(i, item) for i, item in enumerate(items)])
    return StepResult(output=[end.output for end in ends], input={"items": len(items)})

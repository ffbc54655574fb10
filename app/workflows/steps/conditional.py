"""`conditional`: the first condition that holds picks the action (go on, go to a step of the
same sequence, end it with a value); the output records the decision, so a re-run replays it."""

from __future__ import annotations

from typing import Any

from app.workflows.definition import Action, ConditionalStep, EndWorkflow, GoToStep
from app.workflows.steps.base import StepEnv, StepResult

CONTINUE = "continue"
GO_TO = "go_to_step"
END = "end_workflow"


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def holds(operator: str, left: Any, right: Any) -> bool:
    """Whether `left <operator> right`; numeric comparisons need numbers on both sides."""
    if operator == "eq":
        return bool(left == right)
    if operator == "ne":
        return bool(left != right)
    if operator in ("gt", "gte", "lt", "lte"):
        if not (_number(left) and _number(right)):
            return False
        return bool(
            {
                "gt": left > right,
                "gte": left >= right,
                "lt": left < right,
                "lte": left <= right,
            }[operator]
        )
    if operator == "is_empty":
        return left is None or left in ("", [], {})
    if operator == "is_not_empty":
        return not (left is None or left in ("", [], {}))
    if operator == "contains":
        if isinstance(left, str):
            return isinstance(right, str) and right in left
        if isinstance(left, list):
            return right in left
        if isinstance(left, dict):
            return isinstance(right, str) and right in left
        return False
    if operator == "starts_with":
        return isinstance(left, str) and isinstance(right, str) and left.startswith(right)
    if operator == "ends_with":
        return isinstance(left, str) and isinstance(right, str) and left.endswith(right)
    raise ValueError(f"unknown operator {operator}")


def _decision(action: Action, env: StepEnv, matched: int | None) -> dict[str, Any]:
    if isinstance(action, GoToStep):
        return {"matched": matched, "action": GO_TO, "target": action.go_to_step}
    if isinstance(action, EndWorkflow):
        return {"matched": matched, "action": END, "value": env.resolve(action.end_workflow)}
    return {"matched": matched, "action": CONTINUE}


async def execute(step: ConditionalStep, env: StepEnv) -> StepResult:
    for index, condition in enumerate(step.conditions):
        left = env.resolve(condition.field)
        right = env.resolve(condition.value)
        if holds(condition.operator, left, right):
            return StepResult(output=_decision(condition.action, env, index))
    return StepResult(output=_decision(step.default_action, env, None))

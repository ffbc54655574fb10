"""Every event type the gateway emits, with what it means (docs/events.md shows examples).

A domain that emits a new event adds it here, so subscriptions can name it.
"""

from __future__ import annotations

PING = "webhook.ping"

EVENT_TYPES: dict[str, str] = {
    "operation.completed": "A job finished with a result.",
    "operation.failed": "A job failed for good (out of attempts, or a permanent error).",
    "operation.cancelled": "A job was cancelled before it finished.",
    "workflow_run.completed": "A workflow run finished; its result holds the output and steps.",
    "workflow_run.failed": "A workflow run failed: a step failed, or it ran out of attempts.",
    "workflow_run.cancelled": "A workflow run was cancelled before it finished.",
    "batch.completed": "Every request of a batch has an outcome; its output file is ready.",
    "batch.failed": "A batch was refused before running (its input file is invalid).",
    "batch.expired": "A batch ran out of its completion window; finished results are kept.",
    "batch.cancelled": "A batch was cancelled; results of requests that finished are kept.",
    "suite_run.completed": "A test suite's run completed: its counts, score and `passed`.",
    "budget.threshold_reached": "Spending under a budget crossed its alert threshold.",
    "budget.exceeded": "Spending under a budget reached its limit.",
    "api_key.created": "An API key was created.",
    "api_key.revoked": "An API key was revoked.",
    PING: "A test event sent on request to one subscription (POST /admin/webhooks/{id}/ping).",
}

WILDCARD = "*"


def groups() -> set[str]:
    """`operation`, `budget`, …: what `<group>.*` may name."""
    return {name.split(".", 1)[0] for name in EVENT_TYPES}


def matches(subscribed: list[str], event_type: str) -> bool:
    """Whether a subscription to `subscribed` (empty: everything) wants `event_type`."""
    if not subscribed:
        return True
    for pattern in subscribed:
        if pattern in (WILDCARD, event_type):
            return True
        if pattern.endswith(".*") and event_type.startswith(pattern[:-1]):
            return True
    return False

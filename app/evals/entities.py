"""The evaluation tables: test cases with assertions, and the result of every run."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import sqlalchemy as sa

from app.storage.entity import (
    Entity,
    choice,
    json_list,
    json_object,
    json_value,
    pk,
    reference,
    text,
)


class TestType(StrEnum):
    MODEL_PROMPT = "model_prompt"
    WORKFLOW = "workflow"


class TestCase(Entity, table=True):
    """An input to a model (with a prompt) or a workflow, and assertions on its output."""

    __test__ = False  # not a pytest test class, despite the name

    __tablename__ = "test_cases"

    id: str = pk()
    name: str = text(max_length=200)
    description: str | None = text(None)
    test_type: TestType = choice(TestType)
    # Tagged by type: model_id, prompt_id, variables, user_message… or workflow_id and input.
    input: dict[str, Any] = json_object()
    # Each assertion: name, operator, expected, and an optional json_path.
    assertions: list[dict[str, Any]] = json_list()
    tags: list[str] = json_list()
    enabled: bool = True


class TestCaseResult(Entity, table=True):
    """The outcome of running one test case once, within a run of one or many cases."""

    __test__ = False

    __tablename__ = "test_case_results"
    __table_args__ = (
        sa.Index("ix_test_case_results_test_case_id_run_id", "test_case_id", "run_id"),
        sa.Index("ix_test_case_results_test_case_id_created_at", "test_case_id", "created_at"),
    )

    id: str = pk()
    # The composite indexes lead with test_case_id, so they serve lookups by test case as well.
    test_case_id: str = reference("test_cases.id", index=False)
    run_id: str = text(max_length=64, index=True)
    operation_id: str | None = text(None, max_length=64)
    passed: bool = False
    score: float | None = None
    output: str | None = text(None)
    output_json: Any = json_value()
    # Each: name, operator, expected, actual (truncated), passed, error.
    assertion_results: list[dict[str, Any]] = json_list()
    execution_time_ms: int = 0
    tokens_used: int | None = None
    error: str | None = text(None)

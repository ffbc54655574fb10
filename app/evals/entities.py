"""The evaluation tables: test cases and their assertions, suites, runs, and each result."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa

from app.storage.entity import (
    Entity,
    big,
    choice,
    instant,
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
    # Tagged by type: user_message, variables, system_message… or the workflow's input.
    input: dict[str, Any] = json_object()
    # What is called: a model, chain, stored prompt version or workflow (`schemas.Target`);
    # None leaves it to the suite (or the run) the case runs in.
    target: dict[str, Any] | None = json_value()
    # Each assertion: type (promptfoo's names, `not-` for the inverse), value, threshold,
    # weight, metric, provider, path.
    assertions: list[dict[str, Any]] = json_list()
    # The least weighted score that passes the case; None: every assertion must pass.
    threshold: float | None = None
    tags: list[str] = json_list()
    enabled: bool = True


class TestSuite(Entity, table=True):
    """A set of test cases, with what they run against by default and the bar a run must clear."""

    __test__ = False

    __tablename__ = "test_suites"

    id: str = pk()
    name: str = text(max_length=200)
    description: str | None = text(None)
    default_target: dict[str, Any] | None = json_value()
    # The model that grades model-graded assertions, and the one that embeds for `similar`.
    judge_model: str | None = text(None, max_length=64)
    embedding_model: str | None = text(None, max_length=64)
    # The share of cases that must pass for a run to pass (the CI gate).
    pass_threshold: float = 1.0
    # The case threshold of cases that have none of their own.
    case_threshold: float | None = None
    # How many cases of one run are in flight at once.
    concurrency: int = 4
    tags: list[str] = json_list()


class TestSuiteCase(Entity, table=True):
    """A test case's place in a suite (deleting either removes it)."""

    __test__ = False

    __tablename__ = "test_suite_cases"
    __table_args__ = (sa.UniqueConstraint("suite_id", "test_case_id"),)

    id: str = pk()
    # The unique key leads with suite_id, so it serves lookups by suite as well.
    suite_id: str = reference("test_suites.id", index=False)
    test_case_id: str = reference("test_cases.id")
    position: int = 0


class RunStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class TestRun(Entity, table=True):
    """One run of a suite (or of a single case): what it ran, as it was when started, and how it
    went. The `test_case_run` job that executes it is `operation_id`."""

    __test__ = False

    __tablename__ = "test_runs"
    __table_args__ = (
        sa.Index("ix_test_runs_suite_id_created_at", "suite_id", "created_at"),
        sa.Index("ix_test_runs_test_case_id_created_at", "test_case_id", "created_at"),
    )

    id: str = pk()
    suite_id: str | None = reference("test_suites.id", nullable=True, index=False)
    # Set for the run of a single case.
    test_case_id: str | None = reference("test_cases.id", nullable=True, index=False)
    operation_id: str | None = text(None, max_length=64)
    owner_key_id: str | None = text(None, max_length=64)
    status: RunStatus = choice(RunStatus, RunStatus.PENDING)
    # The cases as they were when the run started (id, name, input, target, assertions,
    # threshold), so a resumed run and a later comparison judge what this run ran.
    cases: list[dict[str, Any]] = json_list()
    # The run's settings: target override, judge and embedding models, thresholds, concurrency.
    settings: dict[str, Any] = json_object()
    # Counts and scores, written when the run completes (or is cancelled).
    summary: dict[str, Any] = json_object()
    started_at: datetime | None = instant()
    finished_at: datetime | None = instant()


class CaseOutcome(StrEnum):
    PASSED = "passed"
    FAILED = "failed"
    # The target could not be called, or an assertion could not be graded.
    ERRORED = "errored"


class TestCaseResult(Entity, table=True):
    """The outcome of running one test case once, within a run of one or many cases; written
    once per (case, run), so a resumed run skips every case that has one."""

    __test__ = False

    __tablename__ = "test_case_results"
    __table_args__ = (
        sa.UniqueConstraint("test_case_id", "run_id"),
        sa.Index("ix_test_case_results_test_case_id_created_at", "test_case_id", "created_at"),
    )

    id: str = pk()
    # The unique key and the index lead with test_case_id, so they serve lookups by case too.
    test_case_id: str = reference("test_cases.id", index=False)
    run_id: str = reference("test_runs.id")
    operation_id: str | None = text(None, max_length=64)
    outcome: CaseOutcome = choice(CaseOutcome)
    passed: bool = False
    score: float | None = None
    output: str | None = text(None)
    output_json: Any = json_value()
    # Each: type, passed, score, weight, reason, error, metric, tokens.
    assertion_results: list[dict[str, Any]] = json_list()
    # The model that answered (after any fallback).
    model: str | None = text(None, max_length=64)
    execution_time_ms: int = 0
    tokens_used: int | None = None
    cost_micros: int | None = big(None)
    error: str | None = text(None)

"""The walk of a workflow run: each step executed once, its record the checkpoint of the run.

A run is a `workflow_run` job. Its handler (`WorkflowEngine.run`) loads the definition version the
run was submitted with and the records of the steps this run already finished, then walks the
steps in order. A step with a finished record is not executed again: its recorded output is
reused (a conditional's recorded decision replayed), so a run re-delivered after a crash resumes
at the first step without one, and no finished step, LLM call or HTTP request, is repeated. A
step interrupted before its record was written is run again from the start.

Each record is written with the run's progress in one transaction that commits only while the
job's lease holds (`JobContext.save`), so a worker that lost the job cannot record a step.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from app.core.clock import utcnow
from app.core.errors import Cancelled, DomainError, InvalidInput, NotFound, Transient
from app.gateway.calls import CallContext, Caller, CallSource
from app.operations.runner import JobContext, describe, is_transient
from app.storage.protocol import UnitOfWork, Where
from app.workflows.definition import MAX_STEPS, NO_RETRY, ConditionalStep, Step, parse_steps
from app.workflows.entities import FINISHED, StepStatus, WorkflowStepRun, WorkflowVersion
from app.workflows.references import Scope
from app.workflows.schema_check import schema_error
from app.workflows.steps import EXECUTORS
from app.workflows.steps.base import Ended, NestedRun, StepDeps, StepEnv, StepResult
from app.workflows.steps.conditional import END, GO_TO

log = logging.getLogger(__name__)

# Visits of steps in one sequence: a loop of `go_to_step` stops here (a sequence holds at most
# as many steps, so one without a loop never reaches it).
MAX_VISITS = MAX_STEPS


class StepFailed(DomainError):
    """A step failed and its `on_error` is `fail`: the run fails for good."""

    code = "workflow_step_failed"


class StepFailedTransiently(Transient):
    """A step failed in a way another attempt of the run may not (a timeout, an upstream 5xx):
    the job is retried, and resumes at this step."""

    code = "workflow_step_failed"


class StepTimedOut(Transient):
    code = "step_timeout"


class StepOutputInvalid(InvalidInput):
    """A step's output does not conform to its `output_schema`."""

    code = "step_output_invalid"


def step_run_id(operation_id: str, path: str) -> str:
    """The id of a step's record: one per run and step path."""
    digest = hashlib.sha256(f"{operation_id}\x00{path}".encode()).hexdigest()[:40]
    return f"ws-{digest}"


def _retryable(exc: BaseException) -> bool:
    return is_transient(exc) or isinstance(exc, StepOutputInvalid)


class Checkpoints(Protocol):
    """Where a run checks for cancellation and keeps its step records: its job's context
    (`JobContext`), or nowhere for a dry run (`Unrecorded`)."""

    async def checkpoint(self) -> None: ...

    async def save(
        self, write: Callable[[UnitOfWork], Awaitable[Any]], **progress: Any
    ) -> None: ...


class Unrecorded:
    """The checkpoints of a dry run: never cancelled, and nothing written."""

    async def checkpoint(self) -> None:
        return None

    async def save(self, write: Callable[[UnitOfWork], Awaitable[Any]], **progress: Any) -> None:
        return None


@dataclass
class Run:
    """One attempt at a run: its job, caller, the records so far, and the progress counts;
    for a dry run, the steps' mocked outputs (by name) and whether the others are skipped."""

    ctx: Checkpoints
    operation_id: str
    caller: Caller
    context: CallContext
    records: dict[str, WorkflowStepRun]
    total: int
    completed: int = 0
    mocks: Mapping[str, Any] = field(default_factory=dict)
    mock_all: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class WorkflowEngine:
    """Runs `workflow_run` jobs: the steps of one definition version, each recorded once."""

    def __init__(self, deps: StepDeps) -> None:
        self.deps = deps

    async def run(self, ctx: JobContext) -> dict[str, Any]:
        """The handler of a `workflow_run` job: the run's output and a summary of its steps."""
        operation = ctx.operation
        workflow_id = str(operation.input["workflow_id"])
        number = int(operation.input["workflow_version"])
        storage = self.deps.storage
        async with storage.unit_of_work() as uow:
            found = await uow.repo(WorkflowVersion).find(
                Where.eq("workflow_id", workflow_id), Where.eq("workflow_version", number), limit=1
            )
            done = await uow.repo(WorkflowStepRun).find(
                Where.eq("operation_id", operation.id), order_by=["position"]
            )
        if not found.items:
            raise NotFound("workflow version", f"{workflow_id} v{number}")
        steps = parse_steps(found.items[0].steps)
        caller = await self.deps.calls.job_caller(operation)
        context = CallContext(source=CallSource.WORKFLOW_STEP, operation_id=operation.id)
        records = {r.step_path: r for r in done.items}
        run = Run(ctx, operation.id, caller, context, records, total=len(steps))
        run.completed = sum(1 for s in steps if _top_finished(records, s.name))
        ended = await self._sequence(run, steps, Scope(operation.input.get("input")), "")
        return summary(workflow_id, number, ended.output, run.records.values())

    async def dry_run(
        self,
        caller: Caller,
        raw_steps: Any,
        run_input: Any,
        *,
        mocks: Mapping[str, Any],
        mock_all: bool,
        context: CallContext | None = None,
    ) -> tuple[Any, list[WorkflowStepRun], DomainError | None]:
        """Run steps as a test: a step named in `mocks` gives that output, the others run for
        real for `caller` (or are skipped with `mock_all`), and nothing is recorded. The output,
        every step's record, and the error that ended the run, if one did. The calls carry
        `context` (by default a workflow step's, in no job)."""
        steps = parse_steps(raw_steps)
        context = context or CallContext(source=CallSource.WORKFLOW_STEP)
        run_id = context.operation_id or "dry-run"
        run = Run(
            Unrecorded(), run_id, caller, context, {}, len(steps), mocks=mocks, mock_all=mock_all
        )
        error: DomainError | None = None
        output = None
        try:
            output = (await self._sequence(run, steps, Scope(run_input), "")).output
        except DomainError as exc:
            error = exc
        return output, sorted(run.records.values(), key=lambda r: r.position), error

    # ---- the walk ----------------------------------------------------------------------------

    async def _sequence(self, run: Run, steps: list[Step], scope: Scope, prefix: str) -> Ended:
        """Run `steps` in order, following conditionals; the last output (conditionals and
        skipped steps give none)."""
        where = {step.name: index for index, step in enumerate(steps)}
        visits: dict[str, int] = {}
        output: Any = None
        index = 0
        total_visits = 0
        while index < len(steps):
            step = steps[index]
            total_visits += 1
            if total_visits > MAX_VISITS:
                raise StepFailed(
                    f"the run visited {MAX_VISITS} steps in one sequence without ending "
                    f"(a go_to_step loop?); stopped before '{step.name}'"
                )
            visits[step.name] = visits.get(step.name, 0) + 1
            path = prefix + step.name + (f"#{visits[step.name]}" if visits[step.name] > 1 else "")
            await run.ctx.checkpoint()  # a cancelled run starts no further step
            record = await self._step(run, step, scope, path, top=not prefix)
            value = record.output if record.status != StepStatus.SKIPPED else None
            scope.outputs[step.name] = value
            if isinstance(step, ConditionalStep):
                decision: dict[str, Any] = {}
                if record.status == StepStatus.COMPLETED and isinstance(value, dict):
                    decision = value
                action = decision.get("action")
                if action == GO_TO:
                    index = where[decision["target"]]
                    continue
                if action == END:
                    return Ended(decision.get("value"), ended=True)
            elif record.status != StepStatus.SKIPPED:
                output = value
            index += 1
        return Ended(output)

    async def _step(
        self, run: Run, step: Step, scope: Scope, path: str, *, top: bool
    ) -> WorkflowStepRun:
        """The step's record: the finished one of an earlier attempt, or a new one."""
        earlier = run.records.get(path)
        if earlier is not None and earlier.status in FINISHED:
            return earlier
        started = utcnow(), time.perf_counter()
        if step.name in run.mocks:
            mocked = StepResult(run.mocks[step.name], input={"mocked": True})
            return await self._record(
                run, step, path, StepStatus.COMPLETED, mocked, None, 0, started, top
            )
        if run.mock_all:
            return await self._record(
                run, step, path, StepStatus.SKIPPED, StepResult(None), None, 0, started, top
            )
        env = StepEnv(self.deps, run.caller, run.context, scope, path, self._nested(run))
        result, attempts, error = await self._attempts(step, env, run)
        if error is None:
            assert result is not None
            return await self._record(
                run, step, path, StepStatus.COMPLETED, result, None, attempts, started, top
            )
        error_type, message = describe(error)
        failure = {"type": error_type, "message": message}
        status = {"skip": StepStatus.SKIPPED, "default": StepStatus.DEFAULTED}.get(
            step.failure_policy, StepStatus.FAILED
        )
        output = step.default if status is StepStatus.DEFAULTED else None
        record = await self._record(
            run, step, path, status, StepResult(output), failure, attempts, started, top
        )
        if status is not StepStatus.FAILED:
            return record
        text = f"step '{path}' failed: {message}"
        if is_transient(error):
            raise StepFailedTransiently(text, param=path) from error
        raise StepFailed(text, param=path) from error

    async def _attempts(
        self, step: Step, env: StepEnv, run: Run
    ) -> tuple[StepResult | None, int, Exception | None]:
        """Up to the step's `retry.attempts` tries, each within `timeout_ms` and checked against
        `output_schema`: the result, how many attempts it took, and the last error if none
        succeeded. Cancellation is never caught."""
        policy = step.retry or NO_RETRY
        execute = EXECUTORS[step.type]
        timeout = step.timeout_ms / 1000 if step.timeout_ms else None
        error: Exception | None = None
        for attempt in range(1, policy.attempts + 1):
            try:
                async with asyncio.timeout(timeout):
                    result = await execute(step, env)
                if step.output_schema is not None:
                    found = schema_error(step.output_schema, result.output)
                    if found is not None:
                        at = f"output.{found[0]}" if found[0] else "output"
                        raise StepOutputInvalid(f"{at} breaks output_schema: {found[1]}")
                return result, attempt, None
            except Cancelled:
                raise
            except TimeoutError:
                error = StepTimedOut(f"no result within {step.timeout_ms} ms")
            except Exception as exc:
                error = exc
            if attempt == policy.attempts or not _retryable(error):
                return None, attempt, error
            log.info("step %s failed (attempt %d), trying again: %s", env.path, attempt, error)
            await run.ctx.checkpoint()
            await asyncio.sleep(policy.delay(attempt))
        return None, policy.attempts, error

    def _nested(self, run: Run) -> NestedRun:
        async def sequence(steps: list[Step], scope: Scope, prefix: str) -> Ended:
            return await self._sequence(run, steps, scope, prefix)

        return sequence

    async def _record(
        self,
        run: Run,
        step: Step,
        path: str,
        status: StepStatus,
        result: StepResult,
        error: dict[str, Any] | None,
        attempts: int,
        started: tuple[datetime, float],
        top: bool,
    ) -> WorkflowStepRun:
        """Write the step's record with the run's progress, while the job is still held."""
        async with run.lock:
            earlier = run.records.get(path)
            row = WorkflowStepRun(
                id=step_run_id(run.operation_id, path),
                operation_id=run.operation_id,
                step_path=path,
                step_name=step.name,
                step_type=step.type,
                position=earlier.position if earlier is not None else len(run.records),
                status=status,
                attempts=attempts + (earlier.attempts if earlier is not None else 0),
                input=result.input,
                output=result.output,
                error=error,
                prompt_tokens=result.spent.prompt_tokens,
                completion_tokens=result.spent.completion_tokens,
                cost_micros=result.spent.cost_micros,
                started_at=started[0],
                finished_at=utcnow(),
                duration_ms=int((time.perf_counter() - started[1]) * 1000),
            )
            completed = run.completed + (1 if top and status in FINISHED else 0)
            saved: list[WorkflowStepRun] = []

            async def write(uow: UnitOfWork) -> None:
                repo = uow.repo(WorkflowStepRun)
                if earlier is None:
                    saved.append(await repo.add(row))
                else:
                    row.version = earlier.version
                    row.created_at = earlier.created_at
                    saved.append(await repo.update(row))

            try:
                await run.ctx.save(
                    write, steps_completed=completed, steps_total=run.total, current_step=path
                )
            except InvalidInput as exc:
                # An output the database refuses (a NUL character, say) fails the step for good.
                raise StepFailed(
                    f"step '{path}': its output cannot be stored: {exc.message}"
                ) from exc
            run.completed = completed
            # A dry run records nothing: its rows stay here.
            stored = saved[0] if saved else row
            run.records[path] = stored
            return stored


def _top_finished(records: Mapping[str, WorkflowStepRun], name: str) -> bool:
    found = records.get(name)
    return found is not None and found.status in FINISHED


def step_summary(record: WorkflowStepRun) -> dict[str, Any]:
    """What a run's result says of one step (its output is in the step's own record)."""
    return {
        "name": record.step_name,
        "path": record.step_path,
        "type": record.step_type,
        "status": record.status.value,
        "attempts": record.attempts,
        "duration_ms": record.duration_ms,
        "error": record.error,
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "cost_micros": record.cost_micros,
    }


def summary(workflow_id: str, version: int, output: Any, records: Any) -> dict[str, Any]:
    """A run's result: its output, its steps in the order they were recorded, and the usage of
    its LLM calls."""
    ordered = sorted(records, key=lambda r: r.position)
    return {
        "workflow_id": workflow_id,
        "workflow_version": version,
        "output": output,
        "steps": [step_summary(r) for r in ordered],
        "usage": {
            "prompt_tokens": sum(r.prompt_tokens for r in ordered),
            "completion_tokens": sum(r.completion_tokens for r in ordered),
            "cost_micros": sum(r.cost_micros for r in ordered),
        },
    }

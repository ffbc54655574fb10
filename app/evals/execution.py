"""Running a test run inside its `test_case_run` job: each case's target called, its assertions
graded, its result committed once.

A run is one job, its cases run inside it `concurrency` at a time. Each case's result is a row
keyed by (case, run), committed as soon as the case is graded: a job resumed after its worker
died (the sweeper hands it to another) reads which cases have a row and runs only the others.
A case whose call was in flight when the worker died has no row, so it runs again; a case
with a row never does. Every model call (target, judge, embeddings) goes through
`GatewayCalls` for the job's owner, with the job's operation id in its `CallContext`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import orjson

from app.core.clock import utcnow
from app.core.errors import (
    Cancelled,
    DomainError,
    DuplicateKey,
    InvalidInput,
    RateLimited,
    ReferenceViolation,
)
from app.core.events import EventSink
from app.core.ids import new_id
from app.evals.assertions import (
    Assertion,
    Embeddings,
    GradingError,
    Judged,
    Output,
    Verdict,
    errored,
    grade,
    parse,
    score_case,
)
from app.evals.entities import CaseOutcome, RunStatus, TestCaseResult, TestRun
from app.gateway.cache import CacheControl
from app.gateway.calls import COST_HEADER, CallContext, Caller, CallSource, GatewayCalls
from app.gateway.schemas import ChatCompletionRequest, EmbeddingRequest
from app.operations.runner import JobContext
from app.storage.protocol import IfNull, Storage, UnitOfWork, Where

log = logging.getLogger(__name__)

RESULT_ID_PREFIX = "result"
SUITE_RUN_COMPLETED = "suite_run.completed"
# How often a running run's progress is written to its job (pollers see it move).
PROGRESS_EVERY_SECONDS = 0.5
# A case refused by a rate limit waits and tries again this many times before it errors.
RATE_LIMIT_RETRIES = 3
RATE_LIMIT_MAX_WAIT_SECONDS = 30.0
MAX_OUTPUT_CHARS = 200_000
WORKFLOWS_UNAVAILABLE = (
    "workflows are not available in this gateway: a test case that targets a workflow "
    "cannot run until workflow runs are"
)

T = TypeVar("T")


class WorkflowRunner(Protocol):
    """Runs a workflow for a test case (the workflows domain provides it)."""

    async def check(self, workflow_id: str) -> None:
        """Raise `NotFound` unless `workflow_id` names a workflow that can run."""
        ...

    async def run(
        self,
        caller: Caller,
        workflow_id: str,
        input: dict[str, Any],
        *,
        operation_id: str | None = None,
    ) -> Any:
        """Run the workflow to its end for `caller` and return its output."""
        ...


def evaluation_context(operation_id: str | None) -> CallContext:
    """The context of an evaluation's calls: its job, and no response cache (a case measures
    what the target answers now, at its latency and cost)."""
    return CallContext(
        source=CallSource.EVALUATION,
        operation_id=operation_id,
        cache_control=CacheControl(no_cache=True, no_store=True),
    )


@dataclass
class GatewayGrader:
    """The judge and embedding calls of model-graded assertions, through the gateway."""

    calls: GatewayCalls
    caller: Caller
    context: CallContext
    judge_model: str | None
    embedding_model: str | None

    async def judge(self, model: str | None, messages: list[dict[str, str]]) -> Judged:
        name = model or self.judge_model
        if name is None:
            raise GradingError(
                "no judge model: give the suite a judge_model or the assertion a provider"
            )
        request = ChatCompletionRequest.model_validate(
            {"model": name, "messages": messages, "temperature": 0}
        )
        try:
            completion = await self.calls.complete(self.caller, request, self.context)
        except Cancelled:
            raise
        except DomainError as exc:
            raise GradingError(f"the judge model '{name}' failed: {exc.message}") from exc
        await completion.settle()
        usage = completion.body.get("usage") or {}
        return Judged(_answer_text(completion.body), int(usage.get("total_tokens") or 0))

    async def embed(self, model: str | None, texts: list[str]) -> Embeddings:
        name = model or self.embedding_model
        if name is None:
            raise GradingError(
                "no embedding model: give the suite an embedding_model or the assertion a provider"
            )
        try:
            embedded = await self.calls.embed(
                self.caller, EmbeddingRequest(model=name, input=texts), self.context
            )
        except Cancelled:
            raise
        except DomainError as exc:
            raise GradingError(f"the embedding model '{name}' failed: {exc.message}") from exc
        data = sorted(embedded.body.get("data") or [], key=lambda item: item.get("index", 0))
        usage = embedded.body.get("usage") or {}
        vectors = [[float(x) for x in item["embedding"]] for item in data]
        return Embeddings(vectors, int(usage.get("total_tokens") or 0))


@dataclass
class Answer:
    """What a target answered: its text, and the call's model, tokens and cost."""

    text: str
    model: str | None = None
    tokens: int | None = None
    cost_micros: int | None = None


@dataclass
class Tally:
    """How many of a run's cases are done, and how each came out."""

    total: int
    passed: int = 0
    failed: int = 0
    errored: int = 0

    @property
    def done(self) -> int:
        return self.passed + self.failed + self.errored

    def add(self, outcome: CaseOutcome) -> None:
        setattr(self, outcome.value, getattr(self, outcome.value) + 1)

    def as_dict(self) -> dict[str, int]:
        return {
            "total": self.total,
            "done": self.done,
            "passed": self.passed,
            "failed": self.failed,
            "errored": self.errored,
        }


def summarize(run: TestRun, tally: Tally, score: float | None) -> dict[str, Any]:
    """A run's summary: its counts, mean score and whether it passed (the CI gate)."""
    threshold = float(run.settings.get("pass_threshold", 1.0))
    rate = tally.passed / tally.total if tally.total else 1.0
    return {
        "run_id": run.id,
        "passed": rate >= threshold,
        "pass_rate": rate,
        "pass_threshold": threshold,
        "score": score,
        "progress": tally.as_dict(),
    }


class RunExecutor:
    """Executes test runs in their jobs."""

    def __init__(
        self,
        storage: Storage,
        calls: GatewayCalls,
        *,
        workflows: WorkflowRunner | None = None,
        events: EventSink | None = None,
    ) -> None:
        self._storage = storage
        self._calls = calls
        self._workflows = workflows
        self._events = events

    async def execute(self, ctx: JobContext) -> dict[str, Any]:
        """Run every case of the job's run that has no result yet; the run's summary."""
        run_id = str(ctx.operation.input.get("run_id", ""))
        run = await self._start(run_id)
        caller = await self._calls.job_caller(ctx.operation)
        context = evaluation_context(ctx.operation.id)
        grader = GatewayGrader(
            self._calls,
            caller,
            context,
            run.settings.get("judge_model"),
            run.settings.get("embedding_model"),
        )
        async with self._storage.unit_of_work() as uow:
            kept = await uow.repo(TestCaseResult).find(Where.eq("run_id", run.id))
        tally = Tally(total=len(run.cases))
        scores: dict[str, float] = {}
        for result in kept.items:
            tally.add(CaseOutcome(result.outcome))
            scores[result.test_case_id] = result.score or 0.0
        todo = [case for case in run.cases if case["id"] not in scores]
        if kept.items:
            log.info("run %s resumed: %d cases done, %d to go", run.id, tally.done, len(todo))
        written = time.monotonic()

        async def one(case: dict[str, Any]) -> None:
            nonlocal written
            await ctx.checkpoint()  # a cancelled run starts no further case
            result = await self.evaluate(case, run, caller, context, grader)
            if await self._keep(ctx, result):
                tally.add(CaseOutcome(result.outcome))
                scores[result.test_case_id] = result.score or 0.0
            if time.monotonic() - written >= PROGRESS_EVERY_SECONDS:
                written = time.monotonic()
                await ctx.set_progress(**tally.as_dict())

        await _each(todo, int(run.settings.get("concurrency", 1)), one)
        mean = sum(scores.values()) / len(scores) if scores else None
        summary = summarize(run, tally, mean)
        await ctx.set_progress(**tally.as_dict())
        await self._finish(run, summary)
        return summary

    async def evaluate(
        self,
        case: dict[str, Any],
        run: TestRun,
        caller: Caller,
        context: CallContext,
        grader: GatewayGrader,
    ) -> TestCaseResult:
        """One case: its target called, its assertions graded (never raises for the case's
        own failures: they are its errored result)."""
        started = time.perf_counter()
        try:
            answer = await self._answer(case, caller, context)
        except Cancelled:
            raise
        except DomainError as exc:
            return self._result(case, run, started, error=f"{exc.code}: {exc.message}")
        except Exception as exc:  # a timeout, a lost connection, or a bug: this case errs
            if not isinstance(exc, TimeoutError | ConnectionError | OSError):
                log.exception("run %s: case %s failed unexpectedly", run.id, case["id"])
            return self._result(case, run, started, error=f"the call failed ({type(exc).__name__})")
        latency_ms = int((time.perf_counter() - started) * 1000)
        cost = None if answer.cost_micros is None else answer.cost_micros / 1_000_000
        output = Output(answer.text, latency_ms, cost, task=_task(case))
        verdicts: list[Verdict] = []
        for index, raw in enumerate(case.get("assertions") or []):
            try:
                assertion = parse(raw, param=f"assertions.{index}")
            except InvalidInput as exc:
                verdicts.append(_unreadable(raw, exc.message))
                continue
            verdicts.append(await grade(assertion, output, grader))
        threshold = case.get("threshold")
        if threshold is None:
            threshold = run.settings.get("case_threshold")
        scored = score_case(verdicts, threshold)
        if scored.errored:
            outcome = CaseOutcome.ERRORED
        else:
            outcome = CaseOutcome.PASSED if scored.passed else CaseOutcome.FAILED
        return self._result(
            case,
            run,
            started,
            outcome=outcome,
            score=scored.score,
            answer=answer,
            verdicts=verdicts,
            latency_ms=latency_ms,
            error=scored.reason if scored.errored else None,
        )

    # ---- the target -------------------------------------------------------------------------

    async def _answer(self, case: dict[str, Any], caller: Caller, context: CallContext) -> Answer:
        target = case.get("target")
        if not target:
            raise InvalidInput("the case has no target")
        if target["type"] == "workflow":
            if self._workflows is None:
                raise InvalidInput(WORKFLOWS_UNAVAILABLE, param="target")
            output = await self._workflows.run(
                caller,
                target["workflow_id"],
                dict((case.get("input") or {}).get("input") or {}),
                operation_id=context.operation_id,
            )
            text = output if isinstance(output, str) else _pretty(output)
            return Answer(text[:MAX_OUTPUT_CHARS])
        request = chat_request(case)
        attempt = 0
        while True:
            try:
                completion = await self._calls.complete(caller, request, context)
                break
            except RateLimited as exc:
                attempt += 1
                if attempt > RATE_LIMIT_RETRIES:
                    raise
                await asyncio.sleep(min(max(exc.retry_after, 0.05), RATE_LIMIT_MAX_WAIT_SECONDS))
        await completion.settle()
        usage = completion.body.get("usage") or {}
        cost = completion.headers.get(COST_HEADER)
        return Answer(
            _answer_text(completion.body)[:MAX_OUTPUT_CHARS],
            completion.model_id,
            int(usage["total_tokens"]) if usage.get("total_tokens") is not None else None,
            round(float(cost) * 1_000_000) if cost is not None else None,
        )

    # ---- rows --------------------------------------------------------------------------------

    def _result(
        self,
        case: dict[str, Any],
        run: TestRun,
        started: float,
        *,
        outcome: CaseOutcome = CaseOutcome.ERRORED,
        score: float | None = None,
        answer: Answer | None = None,
        verdicts: Sequence[Verdict] = (),
        latency_ms: int | None = None,
        error: str | None = None,
    ) -> TestCaseResult:
        text = answer.text if answer is not None else None
        return TestCaseResult(
            id=new_id(RESULT_ID_PREFIX),
            test_case_id=case["id"],
            run_id=run.id,
            operation_id=run.operation_id,
            outcome=outcome,
            passed=outcome is CaseOutcome.PASSED,
            score=score if score is not None else 0.0,
            output=text,
            output_json=_json_of(text),
            assertion_results=[v.as_dict() for v in verdicts],
            model=answer.model if answer is not None else None,
            execution_time_ms=(
                latency_ms
                if latency_ms is not None
                else int((time.perf_counter() - started) * 1000)
            ),
            tokens_used=answer.tokens if answer is not None else None,
            cost_micros=answer.cost_micros if answer is not None else None,
            error=error,
        )

    async def _keep(self, ctx: JobContext, result: TestCaseResult) -> bool:
        """Commit a case's result while the job is still this attempt's (`ctx.save`); False when
        it already has one (another delivery of the job wrote it) or the case was deleted
        meanwhile. A deleted run stops the job."""

        async def write(uow: UnitOfWork) -> None:
            await uow.repo(TestCaseResult).add(result)

        try:
            await ctx.save(write)
        except DuplicateKey:
            return False
        except ReferenceViolation:
            async with self._storage.unit_of_work() as uow:
                run = await uow.repo(TestRun).get(result.run_id)
            if run is None:
                raise InvalidInput(f"test run '{result.run_id}' was deleted") from None
            log.info("run %s: case %s was deleted; skipped", result.run_id, result.test_case_id)
            return False
        return True

    async def _start(self, run_id: str) -> TestRun:
        async with self._storage.unit_of_work(autocommit=True) as uow:
            run = await uow.repo(TestRun).update_where(
                run_id,
                {"status": RunStatus.RUNNING, "started_at": IfNull(utcnow())},
                Where.in_("status", [RunStatus.PENDING, RunStatus.RUNNING]),
            )
            if run is None:
                found = await uow.repo(TestRun).get(run_id)
        if run is None:
            if found is None:
                raise InvalidInput(f"test run '{run_id}' does not exist (deleted?)")
            raise InvalidInput(f"test run '{run_id}' is already {found.status.value}")
        return run

    async def _finish(self, run: TestRun, summary: dict[str, Any]) -> None:
        """Record the summary, unless the run was cancelled meanwhile, and a suite's run's
        `suite_run.completed` event with it."""
        changes = {"status": RunStatus.COMPLETED, "summary": summary, "finished_at": utcnow()}
        running = Where.eq("status", RunStatus.RUNNING)
        announce = (
            self._events is not None
            and run.suite_id is not None
            and await self._events.interested(SUITE_RUN_COMPLETED)
        )
        if not announce:
            async with self._storage.unit_of_work(autocommit=True) as uow:
                await uow.repo(TestRun).write_where(run.id, changes, running)
            return
        assert self._events is not None
        async with self._storage.unit_of_work() as uow:
            if await uow.repo(TestRun).write_where(run.id, changes, running):
                data = {"suite_id": run.suite_id, "operation_id": run.operation_id, **summary}
                await self._events.record(uow, SUITE_RUN_COMPLETED, data)
                await uow.commit()


def chat_request(case: dict[str, Any]) -> ChatCompletionRequest:
    """The chat completion a case's model, chain or prompt target is sent."""
    target = case["target"]
    given = case.get("input") or {}
    user = given.get("user_message")
    messages: list[dict[str, Any]] = []
    if target["type"] == "prompt":
        reference: dict[str, Any] = {
            "role": "system" if user else "user",
            "prompt_id": target["prompt_id"],
            "variables": given.get("variables") or {},
        }
        if target.get("version") is not None:
            reference["prompt_version"] = target["version"]
        elif target.get("label") is not None:
            reference["prompt_label"] = target["label"]
        messages.append(reference)
        model = target["model"]
    else:
        if given.get("system_message"):
            messages.append({"role": "system", "content": given["system_message"]})
        model = target["model"] if target["type"] == "model" else target["chain"]
    if user:
        messages.append({"role": "user", "content": user})
    body: dict[str, Any] = {"model": model, "messages": messages}
    for name in ("temperature", "max_tokens"):
        if given.get(name) is not None:
            body[name] = given[name]
    return ChatCompletionRequest.model_validate(body)


def _answer_text(body: dict[str, Any]) -> str:
    """The text of a chat completion's first choice (its tool calls as JSON when it has none)."""
    choices = body.get("choices") or [{}]
    message = choices[0].get("message") or {}
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    if message.get("tool_calls"):
        return orjson.dumps(message["tool_calls"]).decode()
    return ""


def _task(case: dict[str, Any]) -> str:
    given = case.get("input") or {}
    if given.get("type") == "workflow":
        return _pretty(given.get("input") or {})
    return str(given.get("user_message") or given.get("system_message") or "")


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


def _json_of(text: str | None) -> Any:
    if not text or text[0] not in "[{":
        return None
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return None


def _unreadable(raw: Any, message: str) -> Verdict:
    kind = str(raw.get("type", "?")) if isinstance(raw, dict) else "?"
    return errored(Assertion(type=kind, base=kind, inverse=False), message)


async def _each(items: Sequence[T], limit: int, work: Callable[[T], Awaitable[None]]) -> None:
    """`work` on every item, at most `limit` at once; the first error stops the rest."""
    if not items:
        return
    pending = iter(items)

    async def worker() -> None:
        for item in pending:
            await work(item)

    tasks = [asyncio.ensure_future(worker()) for _ in range(min(max(limit, 1), len(items)))]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

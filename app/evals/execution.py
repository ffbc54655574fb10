"""Running a test run as jobs: a child job per case, at most the run's `concurrency` of them
queued or running at once on all the workers together, then the run's own job to sum them up.

A run's operation is a parent (`OperationService.submit_parent` with a window of `concurrency`
and `runs_after_children`); each child holds one planned case. A child calls the case's target
and grades its assertions; its result row and the usage of every call it made (target, judge,
embeddings) are written in the transaction that completes the child, which also counts it on the
parent (passed, failed or errored) and sends the parent's next held child. So a case with a
committed result is a finished job and never runs again. A worker that dies mid-case commits
nothing of it: the sweeper hands the case's job to another worker, which makes its calls again,
and only the attempt that completes keeps a result and is charged. Once the last child is
counted the parent is pending again, and its own run (`close`) writes the run's summary and its
`suite_run.completed` event in one transaction, at most once. Every model call goes through
`GatewayCalls` for the run's owner, with the case's job in its `CallContext`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import orjson

from app.core.clock import utcnow
from app.core.errors import Cancelled, DomainError, InvalidInput, RateLimited
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
from app.evals.entities import CaseOutcome, RunStatus, TestCase, TestCaseResult, TestRun
from app.gateway.cache import CacheControl
from app.gateway.calls import COST_HEADER, CallContext, Caller, CallSource, GatewayCalls
from app.gateway.schemas import ChatCompletionRequest, EmbeddingRequest
from app.operations.entities import Operation, OperationStatus
from app.operations.runner import JobContext
from app.storage.protocol import Storage, Summary, UnitOfWork, Where

log = logging.getLogger(__name__)

RESULT_ID_PREFIX = "result"
SUITE_RUN_COMPLETED = "suite_run.completed"
# A case refused by a rate limit waits and tries again this many times before it errors.
RATE_LIMIT_RETRIES = 3
RATE_LIMIT_MAX_WAIT_SECONDS = 30.0
MAX_OUTPUT_CHARS = 200_000
WORKFLOWS_UNAVAILABLE = (
    "workflows are not available in this gateway: a test case that targets a workflow "
    "cannot run until workflow runs are"
)


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
        context: CallContext,
    ) -> Any:
        """Run the workflow to its end for `caller`, its calls made in `context`, and return
        its output."""
        ...


def evaluation_context(job: CallContext) -> CallContext:
    """The context of an evaluation's calls, from that of the case's job (its id, and its
    ledger: the usage commits with the case's result): no response cache, since a case
    measures what the target answers now, at its latency and cost."""
    return dataclasses.replace(
        job,
        source=CallSource.EVALUATION,
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
    # Raises `Cancelled` once the case's job is cancelled: called before each model call.
    checkpoint: Callable[[], Awaitable[None]] | None = None

    async def judge(self, model: str | None, messages: list[dict[str, str]]) -> Judged:
        name = model or self.judge_model
        if name is None:
            raise GradingError(
                "no judge model: give the suite a judge_model or the assertion a provider"
            )
        request = ChatCompletionRequest.model_validate(
            {"model": name, "messages": messages, "temperature": 0}
        )
        if self.checkpoint is not None:
            await self.checkpoint()
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
        if self.checkpoint is not None:
            await self.checkpoint()
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
    """Executes test runs in their jobs: each case in its own, then the run's summary."""

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
        """A `test_case_run` job: one case of a run (a child), or the run's close (its parent,
        after the last case)."""
        if "case" in ctx.operation.input:
            return await self.run_case(ctx)
        if ctx.operation.children_total:
            return await self.close(ctx)
        raise InvalidInput(
            f"test run '{ctx.operation.input.get('run_id')}' was queued as a single job by an "
            "earlier version of the gateway: start it again"
        )

    async def run_case(self, ctx: JobContext) -> dict[str, Any]:
        """Call one case's target, grade its assertions, and have its result and its calls'
        usage commit with the job's outcome (nothing is called for a run no longer open)."""
        data = ctx.operation.input
        run_id, case = str(data["run_id"]), dict(data["case"])
        settings = dict(data.get("settings") or {})
        if not await self._open(run_id, first=bool(data.get("first"))):
            log.info("run %s is no longer open: case %s not run", run_id, case["id"])
            return {"run_id": run_id, "test_case_id": case["id"], "outcome": None}
        caller = await self._calls.job_caller(ctx.operation)
        context = evaluation_context(self._calls.job_context(ctx))
        grader = GatewayGrader(
            self._calls,
            caller,
            context,
            settings.get("judge_model"),
            settings.get("embedding_model"),
            checkpoint=ctx.checkpoint,
        )
        await ctx.checkpoint()  # a cancelled run calls nothing more
        result = await self.evaluate(case, settings, caller, context, grader, run_id=run_id)
        ctx.write_with_outcome(self._keeper(result))
        ctx.count_as(result.outcome.value)
        return {
            "run_id": run_id,
            "test_case_id": result.test_case_id,
            "outcome": result.outcome.value,
            "score": result.score,
        }

    async def close(self, ctx: JobContext) -> dict[str, Any]:
        """Sum up a run whose every case's job has finished: its summary (the CI gate) on the
        run and as the job's result, an errored result for each case whose job failed or was
        cancelled alone, and a suite's `suite_run.completed` event, all in one transaction."""
        run_id = str(ctx.operation.input.get("run_id", ""))
        async with self._storage.unit_of_work() as uow:
            run = await uow.repo(TestRun).get(run_id)
            if run is None:
                raise InvalidInput(f"test run '{run_id}' does not exist (deleted?)")
            if run.status not in (RunStatus.PENDING, RUNNING):
                return dict(run.summary)  # cancelled, or closed by an attempt that then died
            groups = await uow.repo(TestCaseResult).summarize(
                "outcome", ["score"], Where.eq("run_id", run.id)
            )
            missing = await self._unresulted(uow, run, ctx.operation, groups)
        tally = Tally(total=len(run.cases))
        total_score = 0.0
        for outcome, group in groups.items():
            setattr(tally, outcome, getattr(tally, outcome) + group.count)
            total_score += float(group.moments["score"].total or 0)
        tally.errored += len(missing)
        scored = tally.done
        summary = summarize(run, tally, total_score / scored if scored else None)
        changes = {"status": RunStatus.COMPLETED, "summary": summary, "finished_at": utcnow()}
        announce = (
            self._events is not None
            and run.suite_id is not None
            and await self._events.interested(SUITE_RUN_COMPLETED)
        )

        async def write(uow: UnitOfWork) -> None:
            # Only while the run is open: an attempt that closed it and died closes nothing again.
            if not await uow.repo(TestRun).write_where(run.id, changes, _OPEN):
                return
            if missing:
                await uow.repo(TestCaseResult).add_many(missing)
            if announce:
                assert self._events is not None
                data = {"suite_id": run.suite_id, "operation_id": run.operation_id, **summary}
                await self._events.record(uow, SUITE_RUN_COMPLETED, data)

        await ctx.save(write)
        return summary

    async def evaluate(
        self,
        case: dict[str, Any],
        settings: dict[str, Any],
        caller: Caller,
        context: CallContext,
        grader: GatewayGrader,
        *,
        run_id: str,
    ) -> TestCaseResult:
        """One case: its target called, its assertions graded (never raises for the case's
        own failures: they are its errored result)."""
        started = time.perf_counter()
        result = partial(self._result, case, run_id, context.operation_id, started)
        try:
            answer = await self._answer(case, caller, context)
        except Cancelled:
            raise
        except DomainError as exc:
            return result(error=f"{exc.code}: {exc.message}")
        except Exception as exc:  # a timeout, a lost connection, or a bug: this case errs
            if not isinstance(exc, TimeoutError | ConnectionError | OSError):
                log.exception("run %s: case %s failed unexpectedly", run_id, case["id"])
            return result(error=f"the call failed ({type(exc).__name__})")
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
            threshold = settings.get("case_threshold")
        scored = score_case(verdicts, threshold)
        if scored.errored:
            outcome = CaseOutcome.ERRORED
        else:
            outcome = CaseOutcome.PASSED if scored.passed else CaseOutcome.FAILED
        return result(
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
                context=context,
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

    @staticmethod
    def _result(
        case: dict[str, Any],
        run_id: str,
        operation_id: str | None,
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
            run_id=run_id,
            operation_id=operation_id,
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

    def _keeper(self, result: TestCaseResult) -> Callable[[UnitOfWork], Awaitable[None]]:
        """The write of a case's result, run in the transaction of its job's outcome; a case or
        run deleted meanwhile keeps none (its job still completes)."""

        async def write(uow: UnitOfWork) -> None:
            run = await uow.repo(TestRun).count(Where.eq("id", result.run_id))
            case = await uow.repo(TestCase).count(Where.eq("id", result.test_case_id))
            if not (run and case):
                log.info(
                    "run %s: case %s or its run was deleted; no result kept",
                    result.run_id,
                    result.test_case_id,
                )
                return
            await uow.repo(TestCaseResult).add(result)

        return write

    async def _open(self, run_id: str, *, first: bool) -> bool:
        """Whether the run still takes results (one read); the run's first case, sent first,
        marks it running."""
        async with self._storage.unit_of_work(autocommit=True) as uow:
            runs = uow.repo(TestRun)
            if first:
                started = {"status": RUNNING, "started_at": utcnow()}
                if await runs.write_where(run_id, started, Where.eq("status", RunStatus.PENDING)):
                    return True
            return await runs.count(Where.eq("id", run_id), _OPEN) > 0

    @staticmethod
    async def _unresulted(
        uow: UnitOfWork, run: TestRun, parent: Operation, groups: dict[Any, Summary]
    ) -> list[TestCaseResult]:
        """An errored result for each case of the run that has none: its job failed (out of
        attempts, say) or was cancelled on its own."""
        if sum(g.count for g in groups.values()) >= len(run.cases):
            return []
        kept = await uow.repo(TestCaseResult).find(Where.eq("run_id", run.id))
        done = {r.test_case_id for r in kept.items}
        ended = await uow.repo(Operation).find(
            Where.eq("parent_id", parent.id),
            Where.in_("status", [OperationStatus.FAILED, OperationStatus.CANCELLED]),
        )
        why = {
            str(o.input.get("case", {}).get("id")): o.error_message or o.status.value
            for o in ended.items
        }
        return [
            RunExecutor._result(
                case,
                run.id,
                parent.id,
                time.perf_counter(),
                error=f"the case's job ended without a result: {why.get(case['id'], 'unknown')}",
            )
            for case in run.cases
            if case["id"] not in done
        ]


RUNNING = RunStatus.RUNNING
_OPEN = Where.in_("status", [RunStatus.PENDING, RunStatus.RUNNING])


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

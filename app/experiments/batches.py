"""Experiment batches: every item of a dataset (at the version pinned when the batch was
submitted) through every variant, inside one job.

Items run with bounded concurrency in the job (not as child jobs: one lease, one progress,
one cancellation), each through the variants one after another, control first. Each (item,
variant) outcome is one record, unique per batch, written as its call ends, a variant's with its
differences from control's on that item (the paired tests). A batch run again after its worker
died skips what is recorded and makes only the calls that never finished (one cut off by the
crash is made again, since its answer was never kept).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from pydantic import ValidationError

from app.core.errors import (
    BudgetExceeded,
    Cancelled,
    DomainError,
    DuplicateKey,
    InvalidInput,
    NotFound,
    PermissionDenied,
    RateLimited,
    Transient,
    Unavailable,
)
from app.core.ids import new_id
from app.datasets.entities import DatasetItem
from app.datasets.service import DatasetService
from app.experiments.entities import Experiment, ExperimentRecord, RecordSource, TargetKind
from app.experiments.live import Arm
from app.gateway.calls import CallContext, Caller, CallSource, GatewayCalls
from app.gateway.schemas import ChatCompletionRequest
from app.operations.runner import JobContext
from app.storage.protocol import Storage, Where

log = logging.getLogger(__name__)

MAX_OUTPUT_CHARS = 100_000
# Our own rate limits pause a batch rather than fail its items (they say nothing of a variant).
_RATE_LIMIT_WAITS = 30
_PROGRESS_EVERY = 1.0  # seconds between progress writes
# Errors that stop the batch, rather than count as one item's failure: the caller may no
# longer call, the budget is spent, the job was cancelled, the database is away.
_STOPPING = (BudgetExceeded, Cancelled, PermissionDenied, Unavailable)


async def bounded(limit: int, jobs: Sequence[Callable[[], Awaitable[None]]]) -> None:
    """Run `jobs` with at most `limit` at once; the first failure cancels the rest."""
    pending = iter(jobs)

    async def worker() -> None:
        for job in pending:  # one shared iterator: each job is taken once
            await job()

    tasks = [asyncio.create_task(worker()) for _ in range(min(limit, len(jobs)))]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def item_request(
    item: DatasetItem, experiment: Experiment, model: str, arm: Arm
) -> ChatCompletionRequest:
    """The call an item makes through a variant: its messages, or the experiment's prompt with
    its variables, sent to `model` as the variant changes it."""
    prompt = experiment.target if experiment.target_kind == TargetKind.PROMPT else None
    if "messages" in item.input:
        messages = item.input["messages"]
    elif prompt is not None:
        messages = [
            {"role": "user", "prompt_id": prompt, "variables": item.input.get("variables") or {}}
        ]
    else:
        raise InvalidInput(
            "the item gives prompt variables, but the experiment is not on a prompt",
            param="input",
        )
    request = ChatCompletionRequest.model_validate({"model": model, "messages": messages})
    return arm.apply(request, prompt)


class BatchRunner:
    """Runs `experiment_batch` jobs through the one gateway call path."""

    def __init__(self, storage: Storage, calls: GatewayCalls, datasets: DatasetService) -> None:
        self._storage = storage
        self._calls = calls
        self._datasets = datasets

    async def run(self, ctx: JobContext) -> dict[str, Any]:
        """Run every item not yet recorded for this job through every variant, then sum up."""
        spec = ctx.operation.input
        operation_id = ctx.operation.id
        async with self._storage.unit_of_work() as uow:
            experiment = await uow.repo(Experiment).get(spec["experiment_id"])
        if experiment is None:
            raise InvalidInput(f"experiment '{spec['experiment_id']}' no longer exists")
        try:
            dataset = await self._datasets.get(spec["dataset_id"])
        except NotFound as exc:
            raise InvalidInput(f"dataset '{spec['dataset_id']}' no longer exists") from exc
        # The version pinned at submission (a job submitted before versions were kept pinned
        # its `revision`, the same number): a resumed batch runs on the items it started with.
        version = int(spec.get("dataset_version") or spec["revision"])
        items = await self._datasets.items(dataset.id, version=version)
        arms = [Arm.of(v) for v in experiment.variants]
        control = next(v["id"] for v in experiment.variants if v.get("control"))
        done = await self._recorded(operation_id)
        todo = [i for i in items if any((i.item_id, a.id) not in done for a in arms)]
        total = len(items) * len(arms)
        caller = await self._calls.job_caller(ctx.operation)
        progress = _Progress(ctx, total, len(done))
        await progress.write()

        # Control first, so that each variant's record, written as its call ends, finds
        # control's record of the item (made just before, or by an earlier attempt).
        arms.sort(key=lambda a: a.id != control)

        def job(item: DatasetItem) -> Callable[[], Awaitable[None]]:
            async def one() -> None:
                reference = done.get((item.item_id, control))
                for arm in arms:
                    if (item.item_id, arm.id) in done:
                        continue
                    await ctx.checkpoint()  # a cancelled batch makes no further call
                    record = await self._call(
                        caller, experiment, item, arm, spec["model"], operation_id, ctx
                    )
                    if arm.id == control:
                        reference = record
                    else:
                        pair(record, reference)
                    await self._keep(record)
                    await progress.advance()

            return one

        await bounded(int(spec.get("concurrency") or 1), [job(i) for i in todo])
        await progress.write()
        async with self._storage.unit_of_work() as uow:
            repo = uow.repo(ExperimentRecord)
            mine = Where.eq("operation_id", operation_id)
            recorded = await repo.count(mine)
            succeeded = await repo.count(mine, Where.eq("success", True))
        return {
            "object": "experiment.batch",
            "experiment_id": experiment.id,
            "dataset_id": dataset.id,
            "dataset_version": version,
            "total": total,
            "recorded": recorded,
            "succeeded": succeeded,
            "failed": recorded - succeeded,
            "results": f"/admin/experiments/{experiment.id}/results?operation_id={operation_id}",
        }

    async def _keep(self, record: ExperimentRecord) -> None:
        """Write one call's record as soon as it ends: an answer recorded is never asked
        again, even if the worker dies the next instant."""
        try:
            async with self._storage.unit_of_work(autocommit=True) as uow:
                await uow.repo(ExperimentRecord).add(record)
        except DuplicateKey:
            # A worker that lost this job's lease finished the same call first.
            log.info(
                "%s / %s of %s already recorded",
                record.item_id,
                record.variant_id,
                record.operation_id,
            )
        except Unavailable as exc:
            raise Transient(f"cannot record a batch item: {exc.message}") from exc

    async def _recorded(self, operation_id: str) -> dict[tuple[str | None, str], ExperimentRecord]:
        async with self._storage.unit_of_work() as uow:
            page = await uow.repo(ExperimentRecord).find(Where.eq("operation_id", operation_id))
        return {(r.item_id, r.variant_id): r for r in page.items}

    async def _call(
        self,
        caller: Caller,
        experiment: Experiment,
        item: DatasetItem,
        arm: Arm,
        model: str,
        operation_id: str,
        ctx: JobContext,
    ) -> ExperimentRecord:
        """One item through one variant, as its record (a failure of the call included)."""
        record = ExperimentRecord(
            id=new_id("expr"),
            experiment_id=experiment.id,
            variant_id=arm.id,
            source=RecordSource.OFFLINE,
            unit=item.item_id,
            api_key_id=caller.key_id,
            operation_id=operation_id,
            item_id=item.item_id,
        )
        context = CallContext(source=CallSource.EXPERIMENT, operation_id=operation_id)
        started = time.perf_counter()
        try:
            request = item_request(item, experiment, model, arm)
            for waits in range(_RATE_LIMIT_WAITS + 1):
                try:
                    started = time.perf_counter()
                    completion = await self._calls.complete(caller, request, context)
                    break
                except RateLimited as exc:
                    if waits == _RATE_LIMIT_WAITS:
                        raise Transient(f"rate limited throughout: {exc.message}") from exc
                    await asyncio.sleep(exc.retry_after)
                    await ctx.checkpoint()
            record.latency_ms = int((time.perf_counter() - started) * 1000)
            await completion.settle()
        except _STOPPING:
            raise
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            record.success, record.error = False, f"invalid_request: {where}: {first['msg']}"
            return record
        except DomainError as exc:
            record.latency_ms = int((time.perf_counter() - started) * 1000)
            record.success, record.error = False, f"{exc.code}: {exc.message}"
            return record
        outcome = completion.settle.outcome
        record.model_id = completion.model_id
        record.input_tokens = outcome.input_tokens
        record.output_tokens = outcome.output_tokens
        record.cost_micros = outcome.cost_micros or 0
        record.output = _text(completion.body)
        return record


def pair(record: ExperimentRecord, control: ExperimentRecord | None) -> None:
    """Give a variant's record its differences from control's record of the same item
    (success always; the other metrics where both calls succeeded): the paired tests of the
    batch's results sum them. Without control's record, there is no pair."""
    if control is None:
        return
    record.success_diff = int(record.success) - int(control.success)
    if not (record.success and control.success):
        return
    record.latency_ms_diff = record.latency_ms - control.latency_ms
    if record.first_token_ms is not None and control.first_token_ms is not None:
        record.first_token_ms_diff = record.first_token_ms - control.first_token_ms
    record.input_tokens_diff = record.input_tokens - control.input_tokens
    record.output_tokens_diff = record.output_tokens - control.output_tokens
    record.cost_micros_diff = record.cost_micros - control.cost_micros


def _text(body: dict[str, Any]) -> str | None:
    choices = body.get("choices") or []
    if not choices:
        return None
    content = (choices[0].get("message") or {}).get("content")
    return content[:MAX_OUTPUT_CHARS] if isinstance(content, str) else None


class _Progress:
    """done / total on the job, written at most once a second."""

    def __init__(self, ctx: JobContext, total: int, done: int) -> None:
        self._ctx = ctx
        self.total = total
        self.done = done
        self._written = 0.0

    async def advance(self, calls: int = 1) -> None:
        self.done += calls
        if time.monotonic() - self._written >= _PROGRESS_EVERY:
            await self.write()

    async def write(self) -> None:
        self._written = time.monotonic()
        await self._ctx.set_progress(done=self.done, total=self.total)

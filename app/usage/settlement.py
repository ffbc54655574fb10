"""Settlement: an admitted call's real use counted, and its usage record and log recorded.

`settle` corrects the call's reservations with the real counts and records its usage record
and execution log in its ledger (app/usage/ledger.py: committed before a direct call's answer
leaves, or with its job's outcome); `release` gives its reservations back when no upstream
call was made; `fail` tells the two apart for a call that raised, and `stream` settles a
relayed stream when it ends, cut short or not. Corrections cost no Redis call of their own:
they are queued and ride with the next admission (app/usage/pipeline.py). Records are built as
plain JSON rows, what the entities would dump: building the entities would cost more than the
rest of a call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from app.core.clock import utcnow
from app.core.errors import (
    BudgetExceeded,
    DomainError,
    InvalidInput,
    NotFound,
    PermissionDenied,
    RateLimited,
    Unavailable,
)
from app.core.ids import new_id
from app.core.metrics import observe_settled
from app.logs.entities import ExecutionStatus, ExecutionType
from app.models.entities import Model
from app.usage.admission import Admission, ConfigLookup
from app.usage.entities import UsageStatus, UsageType
from app.usage.ledger import CallUsage, UsageLedger
from app.usage.pipeline import CounterPipeline
from app.usage.pricing import model_cost_micros

log = logging.getLogger(__name__)

T = TypeVar("T")

# Errors raised before any upstream call: nothing was spent.
_NO_CALL_MADE = (InvalidInput, NotFound, PermissionDenied, RateLimited, BudgetExceeded)


@dataclass(slots=True)  # not frozen: that costs five times as much to build, once per call
class UsageOutcome:
    """How an admitted call ended (success or upstream error)."""

    status: UsageStatus = UsageStatus.SUCCESS
    input_tokens: int = 0
    output_tokens: int = 0
    latency_ms: int | None = None  # measured from admission when not given
    cache_hit: bool = False
    # The gateway's own time in milliseconds, as the answer's `x-gateway-overhead-ms` says it.
    overhead_ms: float | None = None
    operation_id: str | None = None
    model_id: str | None = None  # the model that answered, when a fallback did
    provider: str | None = None
    error: str | None = None
    usage_type: UsageType = UsageType.CHAT_COMPLETION
    is_async: bool = False
    # Kept in the execution log only when the application configuration allows bodies
    # (JSON values, or a pydantic model, dumped only then).
    request_body: Any = None
    response_body: Any = None
    workflow_steps: list[dict[str, Any]] = field(default_factory=list)
    cost_micros: int | None = None  # set by `Settlement.priced`, computed at settlement if not
    # Where the usage goes: the job the call runs in (`JobUsage`); None for the process's
    # writer, which commits it before the answer leaves.
    ledger: UsageLedger | None = None


_EXECUTION_TYPES = {
    UsageType.CHAT_COMPLETION: ExecutionType.CHAT_COMPLETION,
    UsageType.EMBEDDING: ExecutionType.EMBEDDING,
    UsageType.WORKFLOW: ExecutionType.WORKFLOW,
}


class Settlement:
    """Ends admitted calls: corrects their counters and records what they used."""

    def __init__(
        self,
        pipeline: CounterPipeline,
        writer: UsageLedger,
        prices: Callable[[str], Awaitable[Model]],
        *,
        config: ConfigLookup | None,
        log_bodies: bool,
    ) -> None:
        self._pipeline = pipeline
        self._writer = writer
        self._prices = prices  # a model by id, for a fallback's price
        self._config = config
        self._default_log_bodies = log_bodies

    async def _answered_by(self, admission: Admission, outcome: UsageOutcome) -> Model:
        model = admission.model
        if outcome.model_id is not None and outcome.model_id != model.id:
            model = await self._prices(outcome.model_id)
        return model

    async def priced(self, admission: Admission, outcome: UsageOutcome) -> int:
        """The call's cost in micro-dollars, as its usage record says it: kept on `outcome`, so
        a response header given it before settlement shows the very figure recorded."""
        if outcome.cost_micros is None:
            model = await self._answered_by(admission, outcome)
            outcome.cost_micros = (
                0
                if outcome.cache_hit
                else model_cost_micros(model, outcome.input_tokens, outcome.output_tokens)
            )
        return outcome.cost_micros

    async def settle(self, admission: Admission, outcome: UsageOutcome) -> None:
        """Correct the reservations with the real counts and record the record and the log in
        the call's ledger; raises `Unavailable` when they could not be written (the counters
        are corrected all the same).

        Settling (or releasing) an admission a second time does nothing.
        """
        if admission.finished:
            return
        admission.finished = True
        model = await self._answered_by(admission, outcome)
        cost = await self.priced(admission, outcome)
        tokens = outcome.input_tokens + outcome.output_tokens
        self._correct(
            admission, tokens - admission.reserved_tokens, 0, cost - admission.reserved_cost_micros
        )
        latency = outcome.latency_ms
        if latency is None:
            latency = int((time.monotonic() - admission.started) * 1000)
        record, entry = _rows(admission, outcome, model, cost, latency, await self._log_bodies())
        if not outcome.cache_hit:  # metrics: what upstream calls used (app/core/metrics.py)
            observe_settled(model.id, outcome.input_tokens, outcome.output_tokens, cost)
        ledger = outcome.ledger or self._writer
        await ledger.record(CallUsage(record, entry, tuple(admission.budget_ids)))

    async def release(self, admission: Admission) -> None:
        """Give back everything `admission` reserved (no upstream call was made)."""
        if admission.finished:
            return
        admission.finished = True
        self._correct(admission, -admission.reserved_tokens, -1, -admission.reserved_cost_micros)

    def _correct(
        self, admission: Admission, token_delta: int, request_delta: int, cost_delta: int
    ) -> None:
        """Queue the corrections of `admission`'s counters (see `CounterPipeline.correct`)."""
        deltas = [
            (key, token_delta if dimension == "tokens" else request_delta)
            for key, dimension in admission.rate_keys
        ]
        if cost_delta:
            deltas += [(key, cost_delta) for key in admission.budget_keys]
        self._pipeline.correct(deltas, epoch=admission.epoch)

    async def _log_bodies(self) -> bool:
        if self._config is not None:
            try:
                value = await self._config("logging.log_request_bodies")
            except Exception:
                log.warning("app configuration unavailable; bodies are not logged", exc_info=True)
                return False
            if value is not None:
                return bool(value)
        return self._default_log_bodies

    async def fail(self, admission: Admission, exc: BaseException, **outcome: Any) -> None:
        """End an admitted call that raised: an upstream error is recorded, anything else
        (bad input, unknown model, cancellation) made no upstream call and is released."""
        if isinstance(exc, DomainError) and not isinstance(exc, _NO_CALL_MADE):
            error = f"{exc.code}: {exc.message}"
            try:
                await self.settle(
                    admission, UsageOutcome(status=UsageStatus.ERROR, error=error, **outcome)
                )
            except Unavailable:
                # The caller hears of `exc`, what went wrong first; the writer keeps the rows.
                log.warning("the usage of a failed call could not be written yet")
        else:
            await self.release(admission)

    async def stream(
        self,
        admission: Admission,
        chunks: AsyncIterator[T],
        usage: Callable[[], dict[str, Any] | None],
        **outcome: Any,
    ) -> AsyncIterator[T]:
        """Relay `chunks`, then settle with `usage()` (the stream's OpenAI usage object).

        A stream cut short (client gone, upstream failure) still counts what it used.
        """
        status = UsageStatus.SUCCESS
        error: str | None = None
        try:
            async for chunk in chunks:
                yield chunk
        except BaseException as exc:
            if not usage():
                await self.fail(admission, exc, **outcome)
                raise
            status, error = UsageStatus.ERROR, f"stream interrupted: {type(exc).__name__}"
            raise
        finally:
            if not admission.finished:
                used = usage() or {}
                settled = UsageOutcome(
                    status=status,
                    error=error,
                    input_tokens=int(used.get("prompt_tokens") or 0),
                    output_tokens=int(used.get("completion_tokens") or 0),
                    **outcome,
                )
                if status is UsageStatus.SUCCESS:
                    # Before the stream's end is sent: a failure is its last event.
                    await self.settle(admission, settled)
                else:
                    try:
                        await self.settle(admission, settled)
                    except Unavailable:
                        log.warning("the usage of a broken stream could not be written yet")


def _rows(
    admission: Admission,
    outcome: UsageOutcome,
    model: Model,
    cost: int,
    latency: int,
    bodies: bool,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The usage record and the execution log of a settled call, as the batch carries them
    (what `model_dump(mode="json")` of the entities gives); bodies only when `bodies`."""
    success = outcome.status is UsageStatus.SUCCESS
    stamp = utcnow().isoformat()
    provider = outcome.provider or str(model.provider)
    record = {
        "id": new_id("usage"),
        "usage_type": outcome.usage_type.value,
        "api_key_id": admission.key_id,
        "team_id": admission.team_id,
        "model_id": model.id,
        "provider": provider,
        "input_tokens": outcome.input_tokens,
        "output_tokens": outcome.output_tokens,
        "cost_micros": cost,
        "latency_ms": latency,
        "status": outcome.status.value,
        "cache_hit": outcome.cache_hit,
        "overhead_ms": outcome.overhead_ms,
        "operation_id": outcome.operation_id,
        "error": outcome.error,
        "created_at": stamp,
        "updated_at": stamp,
        "version": 1,
    }
    entry = {
        "id": new_id("log"),
        "execution_type": _EXECUTION_TYPES.get(outcome.usage_type, ExecutionType.MODEL).value,
        "resource_id": model.id,
        "resource_name": model.name,
        "status": (ExecutionStatus.SUCCESS if success else ExecutionStatus.FAILED).value,
        "input": _jsonable(outcome.request_body) if bodies else None,
        "output": _jsonable(outcome.response_body) if bodies else None,
        "error": outcome.error,
        "cost_micros": cost,
        "input_tokens": outcome.input_tokens,
        "output_tokens": outcome.output_tokens,
        "execution_time_ms": latency,
        "provider": provider,
        "cache_hit": outcome.cache_hit,
        "overhead_ms": outcome.overhead_ms,
        "api_key_id": admission.key_id,
        "user_id": None,
        "team_id": admission.team_id,
        "operation_id": outcome.operation_id,
        "is_async": outcome.is_async,
        "workflow_steps": list(outcome.workflow_steps) if bodies else [],
        "created_at": stamp,
        "updated_at": stamp,
        "version": 1,
    }
    return record, entry


def _jsonable(body: Any) -> Any:
    """A body as JSON values; a request model is dumped only when its body is logged."""
    dump = getattr(body, "model_dump", None)
    return dump(mode="json", exclude_none=True, by_alias=True) if callable(dump) else body

"""The facade the chat path calls: admit a call, then settle or release it.

Three parts do the work: admission (app/usage/admission.py) checks the rate limits and
reserves tokens and maximum cost in one Lua script; settlement (app/usage/settlement.py)
corrects the reservations with the real counts and records the usage record and execution log
(app/usage/ledger.py), or gives the reservations back when no upstream call was made; and both
reach Redis through one pipeline (app/usage/pipeline.py), so a call costs one Redis round trip.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from app.core import tracing
from app.core.invalidation import InvalidationBus
from app.models.entities import Model
from app.storage.protocol import Storage
from app.usage.admission import (
    ADMIT,
    EPOCH_KEY,
    Admission,
    AdmissionControl,
    ConfigLookup,
    KeyAndTeam,
)
from app.usage.budgets import BudgetService
from app.usage.ledger import JobUsage, OutcomeWrites, UsageRows, UsageWriter
from app.usage.limits import RateLimits
from app.usage.pipeline import CounterPipeline
from app.usage.settlement import Settlement, UsageOutcome

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class MeteringOptions:
    default_limits: RateLimits = field(default_factory=RateLimits)
    default_max_output_tokens: int = 4096
    cache_seconds: float = 2.0
    log_bodies: bool = False
    # Bound on each Redis call of the hot path (its client may have no socket timeout, which
    # would cost a task per command in redis-py).
    redis_timeout: float = 5.0


class Metering:
    """Rate limits, budget reservations and usage recording around one upstream call."""

    def __init__(
        self,
        storage: Storage,
        redis: Any,
        budgets: BudgetService,
        writer: UsageWriter,
        rows: UsageRows,
        options: MeteringOptions,
        *,
        config: ConfigLookup | None = None,
        owns_redis: bool = False,
        bus: InvalidationBus | None = None,
    ) -> None:
        self._redis = redis
        self._owns_redis = owns_redis  # a client of its own, closed with this object
        self.writer = writer
        self._rows = rows
        self.config = config
        self._pipeline = CounterPipeline(
            redis, ADMIT, epoch_key=EPOCH_KEY, timeout=options.redis_timeout
        )
        self._admission = AdmissionControl(
            storage,
            redis,
            budgets,
            self._pipeline,
            default_limits=options.default_limits,
            default_max_output_tokens=options.default_max_output_tokens,
            cache_seconds=options.cache_seconds,
            redis_timeout=options.redis_timeout,
            config=config,
            bus=bus or InvalidationBus(None, shared=False),
        )
        self._settlement = Settlement(
            self._pipeline,
            writer,
            self._admission.model,
            config=config,
            log_bodies=options.log_bodies,
        )

    def forget(self, item: str) -> None:
        """Drop the cached copy of what `item` (a `METERING_TOPIC` item) names."""
        self._admission.forget(item)

    async def admit(
        self,
        principal: KeyAndTeam,
        model: Model | str,
        estimated_input_tokens: int,
        max_output_tokens: int | None,
    ) -> Admission:
        """Check the rate limits and reserve tokens and maximum cost; raises when refused
        (`AdmissionControl.admit`)."""
        with tracing.span("gateway.admission") as span:
            span.set_attribute("gateway.model", model if isinstance(model, str) else model.id)
            return await self._admission.admit(
                principal, model, estimated_input_tokens, max_output_tokens
            )

    async def priced(self, admission: Admission, outcome: UsageOutcome) -> int:
        """The call's cost in micro-dollars, as its usage record will say (`Settlement.priced`)."""
        return await self._settlement.priced(admission, outcome)

    async def settle(self, admission: Admission, outcome: UsageOutcome) -> None:
        """Correct the reservations with the real counts and record the record and the log; a
        second settle or release does nothing (`Settlement.settle`)."""
        await self._settlement.settle(admission, outcome)

    def job_usage(self, job: OutcomeWrites) -> JobUsage:
        """The ledger of the calls `job` makes: their usage commits with its outcome (give it
        as the `ledger` of their outcomes)."""
        return JobUsage(self._rows, job)

    async def release(self, admission: Admission) -> None:
        """Give back everything `admission` reserved (no upstream call was made)."""
        await self._settlement.release(admission)

    async def fail(self, admission: Admission, exc: BaseException, **outcome: Any) -> None:
        """End an admitted call that raised: recorded when an upstream error, else released
        (`Settlement.fail`)."""
        await self._settlement.fail(admission, exc, **outcome)

    def stream(
        self,
        admission: Admission,
        chunks: AsyncIterator[T],
        usage: Callable[[], dict[str, Any] | None],
        **outcome: Any,
    ) -> AsyncIterator[T]:
        """Relay `chunks`, then settle with `usage()`, a stream cut short too
        (`Settlement.stream`)."""
        return self._settlement.stream(admission, chunks, usage, **outcome)

    async def flush_corrections(self) -> None:
        """Send the queued counter corrections now, and wait for any being sent (shutdown)."""
        await self._pipeline.flush()

    @asynccontextmanager
    async def metered(
        self,
        principal: KeyAndTeam,
        model: Model | str,
        estimated_input_tokens: int,
        max_output_tokens: int | None,
        **outcome: Any,
    ) -> AsyncIterator[MeteredCall]:
        """`admit`, then `settle` with what the block reported through `call.done(...)`.

        A block that fails with an upstream error settles it as an error; one that fails
        before any upstream call (bad input, unknown model) or is cancelled releases the
        reservations. `outcome` holds fields common to both (operation id, usage type...).
        """
        admission = await self.admit(principal, model, estimated_input_tokens, max_output_tokens)
        call = MeteredCall(admission, outcome)
        try:
            yield call
        except BaseException as exc:
            await self.fail(admission, exc, **outcome)
            raise
        if call.outcome is None:
            await self.release(admission)
        else:
            await self.settle(admission, call.outcome)

    async def close(self) -> None:
        """Send the queued counter corrections, and write the usage that failed to be written
        before (graceful shutdown)."""
        await self.flush_corrections()
        await self.writer.close()
        if self._owns_redis:
            await self._redis.aclose()


class MeteredCall:
    """The call inside `Metering.metered`: its rate-limit headers, and how it ended."""

    def __init__(self, admission: Admission, common: dict[str, Any]) -> None:
        self.admission = admission
        self.outcome: UsageOutcome | None = None
        self._common = common

    @property
    def headers(self) -> dict[str, str]:
        return self.admission.headers

    def done(self, **outcome: Any) -> None:
        """Record how the call ended (`UsageOutcome` fields); settled when the block exits."""
        self.outcome = UsageOutcome(**{**self._common, **outcome})

    def done_with_usage(self, usage: dict[str, Any] | None, **outcome: Any) -> None:
        """`done` from an OpenAI `usage` object (`prompt_tokens`, `completion_tokens`)."""
        usage = usage or {}
        self.done(
            input_tokens=int(usage.get("prompt_tokens") or 0),
            output_tokens=int(usage.get("completion_tokens") or 0),
            **outcome,
        )

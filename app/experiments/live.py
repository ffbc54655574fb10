"""Experiments on live traffic: the running ones, cached in each process, enrol the calls on
their model or prompt (`VariantChooser` of `app.gateway.variants`), and each enrolled call's
outcome becomes a record."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from app.core.clock import utcnow
from app.core.ids import new_id
from app.core.invalidation import InvalidationBus
from app.core.loading import LoadingCache
from app.core.log_context import request_id_var
from app.experiments.assignment import Splitter, bucket
from app.experiments.entities import (
    Experiment,
    ExperimentRecord,
    ExperimentStatus,
    RecordSource,
    TargetKind,
    UnitKind,
)
from app.gateway.calls import CallContext, Caller
from app.gateway.schemas import ChatCompletionRequest, ChatMessage
from app.gateway.variants import CallReport
from app.storage.mapping import construct
from app.storage.protocol import Storage, Where

log = logging.getLogger(__name__)

# Changes to experiments drop every process's copy of the running ones.
EXPERIMENTS_TOPIC = "experiments"
# How long a process trusts its copy while invalidation messages reach it (`bus.ttl`).
RUNNING_TTL = 30.0
# How long a live call's record may wait in its process before it is written.
FLUSH_INTERVAL = 0.2
_RUNNING = "running"
_RETRY_AFTER = 1.0


@dataclass(frozen=True, slots=True)
class Arm:
    """A variant as calls are changed by it."""

    id: str
    model: str | None
    prompt_version: int | None
    params: dict[str, Any]

    @classmethod
    def of(cls, variant: dict[str, Any]) -> Arm:
        params = {k: v for k, v in (variant.get("params") or {}).items() if v is not None}
        return cls(variant["id"], variant.get("model"), variant.get("prompt_version"), params)

    def apply(self, request: ChatCompletionRequest, prompt_id: str | None) -> ChatCompletionRequest:
        """`request` as this variant makes it: its model, its parameters over the caller's,
        and the messages using the experiment's prompt pinned to its version."""
        changes: dict[str, Any] = dict(self.params)
        if self.model is not None:
            changes["model"] = self.model
        if self.prompt_version is not None and prompt_id is not None:
            changes["messages"] = [
                _pinned(m, prompt_id, self.prompt_version) for m in request.messages
            ]
        return request.model_copy(update=changes) if changes else request


def _pinned(message: ChatMessage, prompt_id: str, version: int) -> ChatMessage:
    extra = message.model_extra or {}
    if extra.get("prompt_id") != prompt_id:
        return message
    values = message.model_dump(exclude_none=True)
    values.pop("prompt_label", None)
    values["prompt_version"] = version
    return ChatMessage.model_validate(values)


@dataclass(frozen=True, slots=True)
class Running:
    """A running experiment as assignment uses it."""

    id: str
    target_kind: TargetKind
    target: str
    unit: UnitKind
    salt: str
    arms: tuple[Arm, ...]
    splitter: Splitter

    @classmethod
    def of(cls, experiment: Experiment) -> Running:
        return cls(
            experiment.id,
            TargetKind(experiment.target_kind),
            experiment.target,
            UnitKind(experiment.unit),
            experiment.salt,
            tuple(Arm.of(v) for v in experiment.variants),
            Splitter([int(v["weight"]) for v in experiment.variants]),
        )

    def assign(self, unit: str) -> Arm:
        """The variant of `unit`: always the same for the same unit and salt."""
        return self.arms[self.splitter.index(bucket(self.salt, unit))]

    def unit_of(
        self, caller: Caller, request: ChatCompletionRequest, context: CallContext
    ) -> str | None:
        if self.unit is UnitKind.API_KEY:
            return caller.key_id
        if self.unit is UnitKind.USER:
            return request.user or None
        return context.unit or None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The running experiments of this process, by the model and by the prompt they target."""

    models: dict[str, Running]
    prompts: dict[str, Running]
    # Read while storage failed: nothing is enrolled until the next read, a second later.
    failed: bool = False

    def find(self, request: ChatCompletionRequest) -> Running | None:
        """The experiment a call belongs to: the one on its model, else on a prompt it uses
        (one experiment per call, so two never bias each other's split)."""
        found = self.models.get(request.model)
        if found is not None or not self.prompts:
            return found
        for message in request.messages:
            prompt_id = (message.model_extra or {}).get("prompt_id")
            if isinstance(prompt_id, str) and prompt_id in self.prompts:
                return self.prompts[prompt_id]
        return None


class RecordWriter:
    """Buffers the records of live calls and writes them together, in one statement, every
    `interval` seconds or as soon as `max_rows` wait: enrolling a call adds no database round
    trip to it. Rows that cannot be written are kept for the next attempt, up to
    `max_buffered` (the oldest are dropped past that, and logged)."""

    def __init__(
        self,
        storage: Storage,
        *,
        interval: float = FLUSH_INTERVAL,
        max_rows: int = 500,
        max_buffered: int = 50_000,
    ) -> None:
        self._storage = storage
        self._interval = interval
        self._max_rows = max_rows
        self._max_buffered = max_buffered
        # What makes each record: built when written, so the call itself pays for none.
        self._rows: list[Callable[[], ExperimentRecord]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._flushing: asyncio.Task[None] | None = None

    def add(self, record: Callable[[], ExperimentRecord]) -> None:
        """Queue the record `record()` makes for the next write (never blocks, never fails)."""
        self._rows.append(record)
        if len(self._rows) > self._max_buffered:
            dropped = len(self._rows) - self._max_buffered
            del self._rows[:dropped]
            log.error("experiment records unwritable: dropped the %d oldest", dropped)
        if len(self._rows) >= self._max_rows:
            self._start()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._interval, self._start)

    def _start(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.get_running_loop().create_task(self.flush())

    async def flush(self) -> None:
        """Write what is buffered now (and wait for a write under way)."""
        flushing = self._flushing
        if flushing is not None and not flushing.done() and asyncio.current_task() is not flushing:
            await asyncio.shield(flushing)
        while self._rows:
            rows, self._rows = self._rows, []
            try:
                records = [make() for make in rows]
                async with self._storage.unit_of_work(autocommit=True) as uow:
                    await uow.repo(ExperimentRecord).add_many(records)
            except Exception as exc:
                log.warning("cannot write %d experiment records yet: %s", len(rows), exc)
                self._rows[:0] = rows
                if self._timer is None:
                    loop = asyncio.get_running_loop()
                    self._timer = loop.call_later(self._interval * 5, self._start)
                return

    async def close(self) -> None:
        """Write what is left (shutdown)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        await self.flush()


@dataclass(slots=True)
class LiveEnrolment:
    """A call enrolled in an experiment (`app.gateway.variants.Enrolment`)."""

    request: ChatCompletionRequest
    writer: RecordWriter
    experiment_id: str
    variant_id: str
    unit: str
    api_key_id: str | None
    request_id: str | None
    operation_id: str | None

    async def report(self, outcome: CallReport) -> None:
        self.writer.add(functools.partial(self.record, outcome, utcnow()))

    def record(self, outcome: CallReport, at: datetime) -> ExperimentRecord:
        """The record of this call, which ended at `at`."""
        return construct(
            ExperimentRecord,
            id=new_id("expr"),
            experiment_id=self.experiment_id,
            variant_id=self.variant_id,
            source=RecordSource.LIVE,
            unit=self.unit,
            api_key_id=self.api_key_id,
            request_id=self.request_id,
            operation_id=self.operation_id,
            model_id=outcome.model_id,
            input_tokens=outcome.input_tokens,
            output_tokens=outcome.output_tokens,
            cost_micros=outcome.cost_micros,
            latency_ms=outcome.latency_ms,
            first_token_ms=outcome.first_token_ms,
            success=outcome.error is None,
            error=outcome.error,
            created_at=at,
            updated_at=at,
        )


class LiveExperiments:
    """The `VariantChooser` of `GatewayCalls`: enrols calls in the running experiments."""

    def __init__(self, storage: Storage, bus: InvalidationBus, *, ttl: float = RUNNING_TTL) -> None:
        self._storage = storage
        self.records = RecordWriter(storage)
        # One shared read when the copy is missing; a stale copy is served for a moment
        # while it is refreshed, so no call waits on the database for it.
        self._running: LoadingCache[str, Snapshot] = LoadingCache(
            self._load,
            ttl=lambda snapshot: _RETRY_AFTER if snapshot.failed else bus.ttl(ttl),
            grace=1.0,
        )
        bus.on(EXPERIMENTS_TOPIC, lambda _item: self._running.clear())

    async def close(self) -> None:
        """Write the records still buffered."""
        await self.records.close()

    async def choose(
        self, caller: Caller, request: ChatCompletionRequest, context: CallContext
    ) -> LiveEnrolment | None:
        snapshot = self._running.get(_RUNNING)
        if snapshot is None:
            snapshot = await self._running.load(_RUNNING)
        experiment = snapshot.find(request)
        if experiment is None:
            return None
        unit = experiment.unit_of(caller, request, context)
        if unit is None:
            return None  # nothing to assign by: the call is not part of the experiment
        arm = experiment.assign(unit)
        prompt = experiment.target if experiment.target_kind is TargetKind.PROMPT else None
        return LiveEnrolment(
            request=arm.apply(request, prompt),
            writer=self.records,
            experiment_id=experiment.id,
            variant_id=arm.id,
            unit=unit,
            api_key_id=caller.key_id,
            request_id=request_id_var.get() or context.operation_id,
            operation_id=context.operation_id,
        )

    async def _load(self, _key: str) -> Snapshot:
        models: dict[str, Running] = {}
        prompts: dict[str, Running] = {}
        try:
            async with self._storage.unit_of_work() as uow:
                page = await uow.repo(Experiment).find(Where.eq("status", ExperimentStatus.RUNNING))
            for experiment in page.items:
                running = Running.of(experiment)
                by_target = models if running.target_kind is TargetKind.MODEL else prompts
                by_target[running.target] = running
        except Exception as exc:
            # Experiments never fail a call: without their list, calls go as asked.
            log.warning("running experiments unavailable (%s); calls are not enrolled", exc)
            return Snapshot({}, {}, failed=True)
        return Snapshot(models, prompts)

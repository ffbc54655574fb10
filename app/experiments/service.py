"""Experiments: their design and lifecycle, feedback on the calls they measured, their results,
and the batches that run a dataset through every variant."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Sequence
from typing import Any

from app.core.clock import utcnow
from app.core.errors import Conflict, DuplicateKey, InvalidInput, NotFound, StaleVersion
from app.core.invalidation import InvalidationBus
from app.datasets.service import DatasetService
from app.experiments.assignment import BUCKETS
from app.experiments.entities import (
    Experiment,
    ExperimentFeedbackChange,
    ExperimentRecord,
    ExperimentStatus,
    RecordSource,
    TargetKind,
)
from app.experiments.lifecycle import (
    COMPLETE,
    DELETABLE,
    EDITABLE,
    PAUSE,
    RESUME,
    START,
    Move,
    move,
)
from app.experiments.live import EXPERIMENTS_TOPIC, FLUSH_INTERVAL, RecordWriter
from app.experiments.results import QUANTILES, Aggregates, analyse
from app.experiments.schemas import (
    BatchCreate,
    ExperimentCreate,
    ExperimentUpdate,
    ResultsRead,
    VariantSpec,
)
from app.experiments.totals import Totals, change_of, save_watermark, watermark
from app.gateway.chat import ChatService
from app.operations.entities import Operation
from app.operations.service import OperationService, check_operation_id
from app.operations.submit import Owner
from app.prompts.service import PromptService
from app.queue.names import OperationKind
from app.storage.protocol import Page, Storage, Where, given
from app.storage.reads import get_existing, read_existing, read_page

log = logging.getLogger(__name__)

_FEEDBACK_ATTEMPTS = 5


def design(target_kind: TargetKind, variants: Sequence[VariantSpec]) -> list[dict[str, Any]]:
    """The variants as stored, once they make one experiment: unique ids, one control, and
    allocations summing to 100 %; a prompt version only on an experiment of a prompt."""
    seen: set[str] = set()
    for i, variant in enumerate(variants):
        if variant.id in seen:
            raise InvalidInput(f"two variants are named '{variant.id}'", param=f"variants.{i}.id")
        seen.add(variant.id)
        if variant.prompt_version is not None and target_kind is not TargetKind.PROMPT:
            raise InvalidInput(
                "a prompt version needs an experiment whose target_kind is prompt",
                param=f"variants.{i}.prompt_version",
            )
    controls = [v.id for v in variants if v.control]
    if len(controls) != 1:
        raise InvalidInput(
            f"exactly one variant must be the control; {len(controls)} are", param="variants"
        )
    weights = [round(v.allocation * 100) for v in variants]
    if sum(weights) != BUCKETS:
        shown = ", ".join(f"{v.id}: {v.allocation:g}" for v in variants)
        raise InvalidInput(
            f"the allocations must sum to 100; they sum to {sum(weights) / 100:g} ({shown})",
            param="variants",
        )
    return [
        {
            "id": v.id,
            "name": v.name or v.id,
            "description": v.description,
            "control": v.control,
            "weight": weight,
            "model": v.model,
            "prompt_version": v.prompt_version,
            "params": v.params.model_dump(exclude_none=True),
        }
        for v, weight in zip(variants, weights, strict=True)
    ]


class ExperimentService:
    """Design, run and read experiments; record feedback; submit their batches."""

    def __init__(
        self,
        storage: Storage,
        bus: InvalidationBus,
        *,
        chat: ChatService,
        prompts: PromptService,
        datasets: DatasetService,
        operations: OperationService,
        records: RecordWriter,
    ) -> None:
        self._storage = storage
        self._bus = bus
        self._chat = chat
        self._prompts = prompts
        self._datasets = datasets
        self._operations = operations
        self._records = records
        self._totals = Totals(storage)

    # ---- design ---------------------------------------------------------------------------

    async def create(self, data: ExperimentCreate) -> Experiment:
        """A draft experiment (nothing is intercepted until it is started)."""
        experiment = Experiment(
            id=data.id,
            name=data.name,
            description=data.description,
            target_kind=data.target_kind,
            target=data.target,
            unit=data.unit,
            salt=data.salt or secrets.token_hex(8),
            variants=design(data.target_kind, data.variants),
            primary_metric=data.primary_metric,
            minimum_effect=data.minimum_effect,
        )
        try:
            async with self._storage.unit_of_work() as uow:
                await uow.repo(Experiment).add(experiment)
                await uow.commit()
        except DuplicateKey as exc:
            raise Conflict(f"experiment '{data.id}' already exists", param="id") from exc
        return experiment

    async def get(self, experiment_id: str) -> Experiment:
        return await read_existing(self._storage, Experiment, experiment_id, "experiment")

    async def list(
        self,
        *,
        status: ExperimentStatus | None = None,
        limit: int = 20,
        after: str | None = None,
    ) -> Page[Experiment]:
        """Experiments by id, a page at a time."""
        return await read_page(
            self._storage,
            Experiment,
            *given(Where.eq("status", status)),
            order_by=["id"],
            limit=limit,
            after=after,
        )

    async def update(self, experiment_id: str, changes: ExperimentUpdate) -> Experiment:
        """Apply the changes its status allows (`lifecycle.EDITABLE`), else `Conflict`."""
        async with self._storage.unit_of_work() as uow:
            experiment = await get_existing(uow.repo(Experiment), experiment_id, "experiment")
            status = ExperimentStatus(experiment.status)
            frozen = sorted(changes.model_fields_set - EDITABLE[status])
            if frozen:
                raise Conflict(
                    f"experiment '{experiment_id}' is {status.value}: {', '.join(frozen)} "
                    "can change only in a draft (it would bias what was measured)",
                    param=frozen[0],
                )
            values = changes.model_dump(exclude_unset=True, exclude={"variants"})
            for name, value in values.items():
                setattr(experiment, name, value)
            kind = TargetKind(experiment.target_kind)
            if changes.variants is not None:
                experiment.variants = design(kind, changes.variants)
            elif "target_kind" in changes.model_fields_set:
                # The stored variants must still make sense for the new target.
                design(kind, [_spec(v) for v in experiment.variants])
            experiment = await uow.repo(Experiment).update(experiment)
            await uow.commit()
        return experiment

    async def delete(self, experiment_id: str) -> None:
        """Remove an experiment and its records; a running one must be paused first."""
        async with self._storage.unit_of_work() as uow:
            experiment = await get_existing(uow.repo(Experiment), experiment_id, "experiment")
            if experiment.status not in DELETABLE:
                raise Conflict(
                    f"experiment '{experiment_id}' is running: pause or complete it first",
                    param="status",
                )
            await uow.repo(Experiment).delete(experiment_id)
            await uow.commit()
        await self._bus.publish(EXPERIMENTS_TOPIC)

    # ---- lifecycle ------------------------------------------------------------------------

    async def start(self, experiment_id: str) -> Experiment:
        """draft → running: every model and prompt version it names must exist now."""
        experiment = await self.get(experiment_id)
        await self._check_references(experiment)
        return await self._move(experiment_id, START)

    async def pause(self, experiment_id: str) -> Experiment:
        """running → paused: calls go as asked, records kept."""
        return await self._move(experiment_id, PAUSE)

    async def resume(self, experiment_id: str) -> Experiment:
        """paused → running, the same units in the same variants."""
        return await self._move(experiment_id, RESUME)

    async def complete(self, experiment_id: str) -> Experiment:
        """running or paused → completed: no more calls are enrolled, nor feedback taken."""
        return await self._move(experiment_id, COMPLETE)

    async def _move(self, experiment_id: str, step: Move) -> Experiment:
        async with self._storage.unit_of_work() as uow:
            repo = uow.repo(Experiment)
            experiment = await get_existing(repo, experiment_id, "experiment")
            move(experiment, step)
            to = step.target
            if to is ExperimentStatus.RUNNING:
                await self._refuse_overlap(experiment)
            now = utcnow()
            if step is START:
                experiment.started_at = now
            if to is ExperimentStatus.COMPLETED:
                experiment.completed_at = now
            experiment = await repo.update(experiment)
            await uow.commit()
        await self._bus.publish(EXPERIMENTS_TOPIC)
        log.info("experiment %s is %s", experiment_id, to.value)
        return experiment

    async def _refuse_overlap(self, experiment: Experiment) -> None:
        async with self._storage.unit_of_work() as uow:
            running = await uow.repo(Experiment).find(
                Where.eq("status", ExperimentStatus.RUNNING),
                Where.eq("target_kind", experiment.target_kind),
            )
        for other in running.items:
            if other.target == experiment.target and other.id != experiment.id:
                raise Conflict(
                    f"experiment '{other.id}' already runs on {experiment.target_kind} "
                    f"'{experiment.target}'; a call can be part of one experiment only",
                    param="target",
                )

    async def _check_references(self, experiment: Experiment) -> None:
        if experiment.target_kind == TargetKind.MODEL:
            await self._exists(experiment.target, "target")
        else:
            await self._prompts.get(experiment.target)
        for i, variant in enumerate(experiment.variants):
            if variant.get("model"):
                await self._exists(variant["model"], f"variants.{i}.model")
            if variant.get("prompt_version") is not None:
                await self._prompts.get_version(experiment.target, variant["prompt_version"])

    async def _exists(self, model: str, param: str) -> None:
        try:
            await self._chat.resolve(model)
        except NotFound as exc:
            raise InvalidInput(
                f"model or chain '{model}' does not exist or is disabled", param=param
            ) from exc

    # ---- feedback -------------------------------------------------------------------------

    async def feedback(
        self, *, key_id: str | None, request_id: str, score: float | None, label: str | None
    ) -> ExperimentRecord:
        """Attach an outcome to the caller's own call `request_id` (its latest, should the
        caller have reused the id); a call no experiment measured is `NotFound`."""
        record = await self._own_record(key_id, request_id)
        if record is None:
            # Its record may still wait in this process's buffer, or another one's.
            await self._records.flush()
            record = await self._own_record(key_id, request_id)
        if record is None:
            await asyncio.sleep(FLUSH_INTERVAL + 0.05)
            record = await self._own_record(key_id, request_id)
        if record is None:
            raise NotFound("experiment call", request_id, param="request_id")
        experiment = await self.get(record.experiment_id)
        if experiment.status == ExperimentStatus.COMPLETED:
            raise Conflict(
                f"experiment '{experiment.id}' is completed: its results take no more feedback",
                param="request_id",
            )
        for attempt in range(_FEEDBACK_ATTEMPTS):
            try:
                return await self._give_feedback(record.id, request_id, score, label)
            except (StaleVersion, DuplicateKey):
                # A roll-up counted the record meanwhile (or more feedback came): read again.
                if attempt == _FEEDBACK_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _give_feedback(
        self, record_id: str, request_id: str, score: float | None, label: str | None
    ) -> ExperimentRecord:
        """Set the feedback on the record; if a roll-up has counted it already (it is stamped
        below the watermark), record what the change adds to the totals in the same
        transaction. Otherwise the roll-up to come counts the record as written: stepping the
        watermark's version makes a roll-up counting it meanwhile, or this write, start over."""
        async with self._storage.unit_of_work() as uow:
            repo = uow.repo(ExperimentRecord)
            record = await repo.get(record_id)
            if record is None:
                raise NotFound("experiment call", request_id, param="request_id")
            mark, stored = await watermark(uow, record.experiment_id)
            counted = record.commit_stamp is not None and record.commit_stamp < mark.watermark
            change = change_of(record, score, label) if counted else None
            if not counted:
                await save_watermark(uow, mark, stored)
            if score is not None:
                record.feedback_score = score
            if label is not None:
                record.feedback_label = label
            written = await repo.update(record)
            if change is not None:
                await uow.repo(ExperimentFeedbackChange).add(change)
            await uow.commit()
        return written

    async def _own_record(self, key_id: str | None, request_id: str) -> ExperimentRecord | None:
        owner = Where.eq("api_key_id", key_id) if key_id else Where.is_null("api_key_id")
        async with self._storage.unit_of_work() as uow:
            page = await uow.repo(ExperimentRecord).find(
                Where.eq("request_id", request_id), owner, order_by=["-created_at"], limit=1
            )
        return page.items[0] if page.items else None

    # ---- results --------------------------------------------------------------------------

    async def results(self, experiment_id: str, *, operation_id: str | None = None) -> ResultsRead:
        """Live results, or with `operation_id` those of one of its batches, from the totals
        and the records not yet rolled up (nothing is written)."""
        experiment = await self.get(experiment_id)
        if operation_id is None:
            source = RecordSource.LIVE
        else:
            check_operation_id(operation_id, param="operation_id")
            source = RecordSource.OFFLINE
        found = await self._totals.read(
            experiment_id, source=source, operation_id=operation_id, fractions=QUANTILES
        )
        aggregates = {v: Aggregates(every, ok, labels) for v, (every, ok, labels) in found.items()}
        return analyse(experiment, aggregates, source=source, operation_id=operation_id)

    async def roll_up(self) -> int:
        """Count the records and feedback of every experiment not yet in its totals (the
        periodic task); how many were."""
        return await self._totals.roll_up_all()

    # ---- batches --------------------------------------------------------------------------

    async def submit_batch(
        self, experiment_id: str, data: BatchCreate, *, owner: Owner
    ) -> tuple[Operation, int]:
        """An `experiment_batch` job running every item of the dataset through every variant;
        the job and how many calls it will make."""
        experiment = await self.get(experiment_id)
        if experiment.status == ExperimentStatus.COMPLETED:
            raise Conflict(f"experiment '{experiment_id}' is completed", param="experiment_id")
        await self._datasets.get(data.dataset_id, param="dataset_id")
        version = await self._datasets.get_version(
            data.dataset_id, data.dataset_version, param="dataset_version"
        )
        if version.item_count == 0:
            raise InvalidInput(
                f"dataset '{data.dataset_id}' has no items at version {version.number}",
                param="dataset_id",
            )
        model = data.model
        if experiment.target_kind == TargetKind.MODEL:
            if model is not None and model != experiment.target:
                raise InvalidInput(
                    f"experiment '{experiment_id}' is on model '{experiment.target}'; "
                    "its batches call it",
                    param="model",
                )
            model = experiment.target
        elif model is None:
            raise InvalidInput(
                "a prompt experiment's batch needs the model to send its items to",
                param="model",
            )
        await self._check_references(experiment)
        await self._exists(model, "model")
        operation, _ = await self._operations.submit(
            kind=OperationKind.EXPERIMENT_BATCH,
            input={
                "experiment_id": experiment_id,
                "dataset_id": version.dataset_id,
                # The batch runs on this version, whatever changes the dataset meanwhile.
                "dataset_version": version.number,
                "model": model,
                "concurrency": data.concurrency,
            },
            owner=owner,
        )
        return operation, version.item_count * len(experiment.variants)


def _spec(variant: dict[str, Any]) -> VariantSpec:
    return VariantSpec(
        id=variant["id"],
        control=bool(variant.get("control")),
        allocation=variant["weight"] / 100,
        model=variant.get("model"),
        prompt_version=variant.get("prompt_version"),
    )

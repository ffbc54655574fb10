"""`/admin/experiments` (design, lifecycle, results, batches) and `/v1/feedback`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse

from app.access.deps import AdminDep, PrincipalDep
from app.core.provide import provide
from app.core.schemas import Deleted, PageAfter, PageLimit
from app.experiments.entities import ExperimentStatus
from app.experiments.schemas import (
    BatchAccepted,
    BatchCreate,
    ExperimentCreate,
    ExperimentList,
    ExperimentRead,
    ExperimentUpdate,
    FeedbackCreate,
    FeedbackRead,
    ResultsRead,
)
from app.experiments.service import ExperimentService
from app.operations.submit import Owner

admin_router = APIRouter(prefix="/admin/experiments", tags=["admin: experiments"])
router = APIRouter(tags=["experiments"])

ExperimentsDep = Annotated[ExperimentService, Depends(provide(ExperimentService))]


@admin_router.post("", response_model=ExperimentRead, status_code=201)
async def create_experiment(
    body: ExperimentCreate, admin: AdminDep, experiments: ExperimentsDep
) -> ExperimentRead:
    """Create an experiment as a draft."""
    return ExperimentRead.of(await experiments.create(body))


@admin_router.get("", response_model=ExperimentList)
async def list_experiments(
    admin: AdminDep,
    experiments: ExperimentsDep,
    status: ExperimentStatus | None = None,
    limit: PageLimit = 20,
    after: PageAfter = None,
) -> ExperimentList:
    """Experiments ordered by id."""
    page = await experiments.list(status=status, limit=limit, after=after)
    return ExperimentList.of(page, ExperimentRead.of)


@admin_router.get("/{experiment_id}", response_model=ExperimentRead)
async def get_experiment(
    experiment_id: str, admin: AdminDep, experiments: ExperimentsDep
) -> ExperimentRead:
    """One experiment."""
    return ExperimentRead.of(await experiments.get(experiment_id))


@admin_router.patch("/{experiment_id}", response_model=ExperimentRead)
async def update_experiment(
    experiment_id: str, body: ExperimentUpdate, admin: AdminDep, experiments: ExperimentsDep
) -> ExperimentRead:
    """Change a draft; once started, only its name and description."""
    return ExperimentRead.of(await experiments.update(experiment_id, body))


@admin_router.delete("/{experiment_id}", response_model=Deleted)
async def delete_experiment(
    experiment_id: str, admin: AdminDep, experiments: ExperimentsDep
) -> Deleted:
    """Delete an experiment that is not running, and its records."""
    await experiments.delete(experiment_id)
    return Deleted(id=experiment_id, object="experiment")


@admin_router.post("/{experiment_id}/start", response_model=ExperimentRead)
async def start_experiment(
    experiment_id: str, admin: AdminDep, experiments: ExperimentsDep
) -> ExperimentRead:
    """draft → running: matching calls are assigned to variants from now on."""
    return ExperimentRead.of(await experiments.start(experiment_id))


@admin_router.post("/{experiment_id}/pause", response_model=ExperimentRead)
async def pause_experiment(
    experiment_id: str, admin: AdminDep, experiments: ExperimentsDep
) -> ExperimentRead:
    """running → paused: calls go as asked until it is resumed."""
    return ExperimentRead.of(await experiments.pause(experiment_id))


@admin_router.post("/{experiment_id}/resume", response_model=ExperimentRead)
async def resume_experiment(
    experiment_id: str, admin: AdminDep, experiments: ExperimentsDep
) -> ExperimentRead:
    """paused → running, each unit in the variant it had."""
    return ExperimentRead.of(await experiments.resume(experiment_id))


@admin_router.post("/{experiment_id}/complete", response_model=ExperimentRead)
async def complete_experiment(
    experiment_id: str, admin: AdminDep, experiments: ExperimentsDep
) -> ExperimentRead:
    """running or paused → completed, for good."""
    return ExperimentRead.of(await experiments.complete(experiment_id))


@admin_router.get("/{experiment_id}/results", response_model=ResultsRead)
async def experiment_results(
    experiment_id: str,
    admin: AdminDep,
    experiments: ExperimentsDep,
    operation_id: Annotated[
        str | None, Query(description="A batch of this experiment: its offline results")
    ] = None,
) -> ResultsRead:
    """Per-variant figures, tests against control, the split check and the winner."""
    return await experiments.results(experiment_id, operation_id=operation_id)


@admin_router.post(
    "/{experiment_id}/batches",
    status_code=202,
    response_model=BatchAccepted,
    responses={202: {"description": "Accepted as an experiment_batch job"}},
)
async def submit_batch(
    experiment_id: str, body: BatchCreate, admin: AdminDep, experiments: ExperimentsDep
) -> JSONResponse:
    """Run every item of a dataset through every variant as a job (poll, or cancel, it at
    `/v1/operations/{operation_id}`)."""
    owner = Owner(key_id=admin.key_id, team_id=admin.team_id)
    operation, total = await experiments.submit_batch(experiment_id, body, owner=owner)
    accepted = BatchAccepted(operation_id=operation.id, status=operation.status, total=total)
    return JSONResponse(
        accepted.model_dump(),
        status_code=202,
        headers={"Location": f"/v1/operations/{operation.id}"},
    )


@router.post("/v1/feedback", response_model=FeedbackRead)
async def feedback(
    body: FeedbackCreate, principal: PrincipalDep, experiments: ExperimentsDep
) -> FeedbackRead:
    """Attach a score or label to a call you made that an experiment measured."""
    record = await experiments.feedback(
        key_id=principal.key_id, request_id=body.request_id, score=body.score, label=body.label
    )
    return FeedbackRead(
        request_id=body.request_id,
        experiment_id=record.experiment_id,
        variant_id=record.variant_id,
        score=record.feedback_score,
        label=record.feedback_label,
    )

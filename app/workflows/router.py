"""`/admin/workflows`, `/admin/external-apis`, and running workflows: `/v1/workflows/...`."""

from __future__ import annotations

from typing import Annotated

import orjson
from fastapi import APIRouter, Depends, Header, Path, Query, Response

from app.access.deps import AdminDep, PrincipalDep
from app.core.provide import provide
from app.core.schemas import Deleted, PageAfter, PageLimit
from app.operations.submit import Owner
from app.operations.transitions import TERMINAL
from app.workflows.schemas import (
    ExecuteRequest,
    ExternalApiCreate,
    ExternalApiList,
    ExternalApiRead,
    ExternalApiUpdate,
    RunAccepted,
    RunRead,
    StepRunList,
    StepRunRead,
    TestRead,
    TestRequest,
    WorkflowClone,
    WorkflowCreate,
    WorkflowList,
    WorkflowRead,
    WorkflowUpdate,
    WorkflowVersionList,
    WorkflowVersionRead,
)
from app.workflows.service import ExternalApiService, WorkflowService

router = APIRouter(tags=["workflows"])
admin_router = APIRouter(prefix="/admin/workflows", tags=["admin: workflows"])
apis_router = APIRouter(prefix="/admin/external-apis", tags=["admin: external APIs"])

WorkflowsDep = Annotated[WorkflowService, Depends(provide(WorkflowService))]
ApisDep = Annotated[ExternalApiService, Depends(provide(ExternalApiService))]
VersionPath = Annotated[int, Path(ge=1)]


# ---- running ---------------------------------------------------------------------------------


@router.post(
    "/v1/workflows/{workflow_id}/execute",
    response_model=RunRead,
    responses={
        202: {"model": RunAccepted, "description": "Accepted as a job, or still running"},
        400: {"description": "The input does not match the input schema (the error names it)"},
        403: {"description": "The key may not run this workflow"},
        404: {"description": "No such workflow"},
    },
)
async def execute_workflow(
    workflow_id: str,
    body: ExecuteRequest,
    principal: PrincipalDep,
    workflows: WorkflowsDep,
    run_async: bool = Query(default=False, alias="async"),
    wait: float | None = Query(
        default=None, ge=0, description="Seconds to wait for the run to finish."
    ),
    idempotency_key: str | None = Header(default=None, max_length=255),
) -> Response:
    """Run a workflow: with `?async=true` a `workflow_run` job to poll (202); without it, the
    run's outcome, or 202 with its operation when it takes longer than the wait."""
    operation = await workflows.execute(
        principal,
        workflow_id,
        body.input,
        run_async=run_async,
        wait=wait,
        idempotency_key=idempotency_key,
    )
    if operation.status in TERMINAL:
        outcome = RunRead.model_validate(await workflows.outcome(operation))
        return Response(outcome.model_dump_json(), media_type="application/json")
    accepted = RunAccepted(operation_id=operation.id, status=operation.status.value)
    return Response(
        orjson.dumps(accepted.model_dump()),
        202,
        {"Location": f"/v1/operations/{operation.id}"},
        media_type="application/json",
    )


@router.get("/v1/workflows/runs/{operation_id}/steps", response_model=StepRunList)
async def list_run_steps(
    operation_id: str, principal: PrincipalDep, workflows: WorkflowsDep
) -> StepRunList:
    """Every step a run has recorded: input, output, error, attempts, timing, tokens, cost."""
    owner = Owner(key_id=principal.key_id, team_id=principal.team_id, admin=principal.admin)
    records = await workflows.steps(operation_id, owner=owner)
    return StepRunList(operation_id=operation_id, data=[StepRunRead.of(r) for r in records])


# ---- definitions -----------------------------------------------------------------------------


@admin_router.post("", response_model=WorkflowRead, status_code=201)
async def create_workflow(
    body: WorkflowCreate, admin: AdminDep, workflows: WorkflowsDep
) -> WorkflowRead:
    """Create a workflow; its definition is checked and becomes version 1."""
    return WorkflowRead.of(await workflows.create(body))


@admin_router.get("", response_model=WorkflowList)
async def list_workflows(
    admin: AdminDep,
    workflows: WorkflowsDep,
    enabled: bool | None = None,
    limit: PageLimit = 20,
    after: PageAfter = None,
) -> WorkflowList:
    """Workflows ordered by id."""
    page = await workflows.list(enabled=enabled, limit=limit, after=after)
    return WorkflowList.of(page, WorkflowRead.of)


@admin_router.get("/{workflow_id}", response_model=WorkflowRead)
async def get_workflow(workflow_id: str, admin: AdminDep, workflows: WorkflowsDep) -> WorkflowRead:
    """A workflow at its current version."""
    return WorkflowRead.of(await workflows.get(workflow_id))


@admin_router.patch("/{workflow_id}", response_model=WorkflowRead)
async def update_workflow(
    workflow_id: str, body: WorkflowUpdate, admin: AdminDep, workflows: WorkflowsDep
) -> WorkflowRead:
    """Change a workflow; new steps or input schema are checked and become a new version."""
    return WorkflowRead.of(await workflows.update(workflow_id, body))


@admin_router.delete("/{workflow_id}", response_model=Deleted)
async def delete_workflow(workflow_id: str, admin: AdminDep, workflows: WorkflowsDep) -> Deleted:
    """Delete a workflow and its kept versions."""
    await workflows.delete(workflow_id)
    return Deleted(id=workflow_id, object="workflow")


@admin_router.post("/{workflow_id}/clone", response_model=WorkflowRead, status_code=201)
async def clone_workflow(
    workflow_id: str, body: WorkflowClone, admin: AdminDep, workflows: WorkflowsDep
) -> WorkflowRead:
    """A copy of the workflow's current definition under a new id (version 1, enabled)."""
    return WorkflowRead.of(await workflows.clone(workflow_id, body))


@admin_router.post("/{workflow_id}/test", response_model=TestRead)
async def test_workflow(
    workflow_id: str, body: TestRequest, admin: AdminDep, workflows: WorkflowsDep
) -> TestRead:
    """A dry run: mocked steps give their mock output, the others run for real (or are
    skipped with `mock_all`); nothing is recorded, every step's record is returned."""
    workflow, output, records, error = await workflows.test(
        admin, workflow_id, body.input, mocks=body.step_mocks, mock_all=body.mock_all
    )
    return TestRead(
        workflow_id=workflow.id,
        workflow_version=workflow.workflow_version,
        success=error is None,
        output=output,
        error=None if error is None else {"type": error.code, "message": error.message},
        steps=[StepRunRead.of(r) for r in records],
    )


@admin_router.get("/{workflow_id}/versions", response_model=WorkflowVersionList)
async def list_workflow_versions(
    workflow_id: str,
    admin: AdminDep,
    workflows: WorkflowsDep,
    limit: PageLimit = 20,
    after: PageAfter = None,
) -> WorkflowVersionList:
    """The kept versions of a workflow's definition, newest first."""
    page = await workflows.list_versions(workflow_id, limit=limit, after=after)
    return WorkflowVersionList.of(page, WorkflowVersionRead.of)


@admin_router.get("/{workflow_id}/versions/{version}", response_model=WorkflowVersionRead)
async def get_workflow_version(
    workflow_id: str, version: VersionPath, admin: AdminDep, workflows: WorkflowsDep
) -> WorkflowVersionRead:
    """One kept version of a workflow's definition."""
    return WorkflowVersionRead.of(await workflows.get_version(workflow_id, version))


# ---- external APIs ---------------------------------------------------------------------------


@apis_router.post("", response_model=ExternalApiRead, status_code=201)
async def create_external_api(
    body: ExternalApiCreate, admin: AdminDep, apis: ApisDep
) -> ExternalApiRead:
    """Create an external API; its base URL must be one the gateway may call."""
    return ExternalApiRead.of(await apis.create(body))


@apis_router.get("", response_model=ExternalApiList)
async def list_external_apis(
    admin: AdminDep, apis: ApisDep, limit: PageLimit = 20, after: PageAfter = None
) -> ExternalApiList:
    """External APIs ordered by id."""
    return ExternalApiList.of(await apis.list(limit=limit, after=after), ExternalApiRead.of)


@apis_router.get("/{api_id}", response_model=ExternalApiRead)
async def get_external_api(api_id: str, admin: AdminDep, apis: ApisDep) -> ExternalApiRead:
    """One external API."""
    return ExternalApiRead.of(await apis.get(api_id))


@apis_router.patch("/{api_id}", response_model=ExternalApiRead)
async def update_external_api(
    api_id: str, body: ExternalApiUpdate, admin: AdminDep, apis: ApisDep
) -> ExternalApiRead:
    """Change an external API; a new base URL is checked as on create."""
    return ExternalApiRead.of(await apis.update(api_id, body))


@apis_router.delete("/{api_id}", response_model=Deleted)
async def delete_external_api(api_id: str, admin: AdminDep, apis: ApisDep) -> Deleted:
    """Delete an external API that no workflow calls."""
    await apis.delete(api_id)
    return Deleted(id=api_id, object="external_api")

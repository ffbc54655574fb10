"""Endpoints to poll, list, cancel and retry jobs."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response

from app.access.deps import AdminDep, PrincipalDep
from app.access.service import Principal
from app.config import Settings
from app.core.errors import InvalidInput
from app.core.provide import provide
from app.core.schemas import PageAfter, PageLimit
from app.operations.entities import OperationStatus
from app.operations.schemas import OperationList, OperationRead
from app.operations.service import OperationService
from app.operations.submit import Owner
from app.queue.names import OperationKind

router = APIRouter(tags=["operations"])
admin_router = APIRouter(prefix="/admin", tags=["admin: operations"])

OperationsDep = Annotated[OperationService, Depends(provide(OperationService))]


@dataclass(frozen=True, slots=True)
class OperationFilter:
    """The filters of both listings (the caller's own jobs, and every owner's for admins)."""

    status: OperationStatus | None = None
    kind: OperationKind | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    # The children of one parent job (a batch's lines, a test run's cases).
    parent_id: str | None = None


FiltersDep = Annotated[OperationFilter, Depends()]
# The process's settings (the long-poll maximum).
SettingsDep = Annotated[Settings, Depends(provide(Settings))]

MAX_IDS = 100


def owner_of(principal: Principal) -> Owner:
    return Owner(key_id=principal.key_id, team_id=principal.team_id, admin=False)


@router.get("/v1/operations/{operation_id}", response_model=OperationRead)
async def get_operation(
    operation_id: str,
    principal: PrincipalDep,
    operations: OperationsDep,
    settings: SettingsDep,
    wait: float = Query(default=0, ge=0, description="Seconds to wait for the job to finish."),
) -> Response:
    """A job's status and, once finished, its result or error."""
    return await poll_response(
        operations, principal, operation_id, wait, max_wait=settings.LONG_POLL_MAX_SECONDS
    )


async def poll_response(
    operations: OperationService,
    principal: Principal,
    operation_id: str,
    wait: float,
    *,
    max_wait: float,
) -> Response:
    """The answer to a poll (also given by the fast path in front of FastAPI); a wait is cut
    to `max_wait` seconds."""
    owner = owner_of(principal)
    if wait > 0:
        timeout = min(wait, max_wait)
        operation = await operations.wait(operation_id, owner=owner, timeout=timeout)
    else:
        operation = await operations.get(operation_id, owner=owner)
    # Serialised here rather than through `response_model`, which would validate the model a
    # second time: this is the route clients poll.
    return Response(OperationRead.of(operation).model_dump_json(), media_type="application/json")


@router.get("/v1/operations", response_model=OperationList)
async def list_operations(
    principal: PrincipalDep,
    operations: OperationsDep,
    filters: FiltersDep,
    ids: str | None = Query(default=None, description="Comma-separated operation ids."),
    limit: PageLimit = 20,
    after: PageAfter = None,
) -> OperationList:
    """The caller's jobs: by ids, or filtered and paged newest first."""
    owner = owner_of(principal)
    if ids is not None:
        wanted = [i.strip() for i in ids.split(",") if i.strip()]
        if not wanted or len(wanted) > MAX_IDS:
            raise InvalidInput(f"ids must list 1 to {MAX_IDS} operation ids", param="ids")
        found = await operations.get_many(wanted, owner=owner)
        return OperationList(data=[OperationRead.of(o) for o in found], has_more=False)
    page = await operations.list(owner=owner, **asdict(filters), limit=limit, after=after)
    return OperationList.of(page, OperationRead.of)


@router.delete("/v1/operations/{operation_id}", response_model=OperationRead)
async def cancel_operation(
    operation_id: str, principal: PrincipalDep, operations: OperationsDep
) -> OperationRead:
    """Cancel a pending or running job; a running worker stops at its next checkpoint."""
    operation = await operations.cancel(operation_id, owner=owner_of(principal))
    return OperationRead.of(operation)


@admin_router.get("/operations", response_model=OperationList)
async def admin_list_operations(
    admin: AdminDep,
    operations: OperationsDep,
    filters: FiltersDep,
    owner_key_id: str | None = None,
    limit: PageLimit = 20,
    after: PageAfter = None,
) -> OperationList:
    """Every owner's jobs, filtered and paged newest first."""
    owner = Owner(key_id=owner_key_id, admin=owner_key_id is None)
    page = await operations.list(
        owner=owner, **asdict(filters), all_owners=owner_key_id is None, limit=limit, after=after
    )
    return OperationList.of(page, OperationRead.of)


@admin_router.post("/operations/{operation_id}/retry", response_model=OperationRead)
async def admin_retry_operation(
    operation_id: str, admin: AdminDep, operations: OperationsDep
) -> OperationRead:
    """Send a failed job again with a fresh set of attempts."""
    return OperationRead.of(await operations.retry(operation_id))

"""`/admin/usage` (records and aggregations, JSON or CSV) and `/admin/budgets`."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response

from app.access.deps import AdminDep
from app.core.clock import utcnow
from app.core.provide import provide
from app.core.schemas import Deleted, PageAfter, PageLimit
from app.usage.budgets import BudgetChanges, BudgetService
from app.usage.entities import BudgetScope
from app.usage.schemas import (
    BudgetCreate,
    BudgetList,
    BudgetRead,
    BudgetUpdate,
    UsageRecordList,
    UsageRecordRead,
    UsageSummary,
)
from app.usage.service import GroupBy, UsageFilter, UsageService, to_csv

usage_router = APIRouter(prefix="/admin/usage", tags=["admin: usage"])
budgets_router = APIRouter(prefix="/admin/budgets", tags=["admin: budgets"])

UsageDep = Annotated[UsageService, Depends(provide(UsageService))]
BudgetsDep = Annotated[BudgetService, Depends(provide(BudgetService))]

# Days a summary can span: the arithmetic on the range must stay within the calendar.
EARLIEST, LATEST = date(1970, 1, 1), date(9999, 1, 1)


@usage_router.get("", response_model=UsageRecordList)
async def list_usage_records(
    admin: AdminDep,
    usage: UsageDep,
    start: datetime | None = None,
    end: datetime | None = None,
    api_key_id: str | None = Query(default=None, max_length=64),
    team_id: str | None = Query(default=None, max_length=64),
    model_id: str | None = Query(default=None, max_length=64),
    limit: int = Query(default=50, ge=1, le=1000),
    after: PageAfter = None,
) -> UsageRecordList:
    """Raw usage records (kept for the usage retention period), newest first."""
    page = await usage.records(
        start=start,
        end=end,
        api_key_id=api_key_id,
        team_id=team_id,
        model_id=model_id,
        limit=limit,
        after=after,
    )
    return UsageRecordList(
        data=[UsageRecordRead.of(r) for r in page.items], next_cursor=page.next_cursor
    )


@usage_router.get(
    "/summary",
    response_model=UsageSummary,
    responses={200: {"content": {"text/csv": {}}, "description": "JSON, or CSV with format=csv"}},
)
async def usage_summary(
    admin: AdminDep,
    usage: UsageDep,
    group_by: GroupBy = GroupBy.DAY,
    start: Annotated[
        date | None,
        Query(description="First UTC day (default: 30 days ago).", ge=EARLIEST, le=LATEST),
    ] = None,
    end: Annotated[
        date | None,
        Query(description="Last UTC day, inclusive (default: today).", ge=EARLIEST, le=LATEST),
    ] = None,
    api_key_id: str | None = Query(default=None, max_length=64),
    team_id: str | None = Query(default=None, max_length=64),
    model_id: str | None = Query(default=None, max_length=64),
    format: Literal["json", "csv"] = "json",
) -> UsageSummary | Response:
    """Requests, errors, tokens and cost per key, team, model or day."""
    last = end or utcnow().date()
    first = start or last - timedelta(days=30)
    rows = await usage.aggregate(
        group_by,
        UsageFilter(
            start=first, end=last, api_key_id=api_key_id, team_id=team_id, model_id=model_id
        ),
    )
    if format == "csv":
        filename = f"usage-by-{group_by.value}-{first.isoformat()}-{last.isoformat()}.csv"
        return Response(
            to_csv(rows),
            media_type="text/csv",
            headers={"content-disposition": f'attachment; filename="{filename}"'},
        )
    return UsageSummary.build(
        group_by.value, first.isoformat(), last.isoformat(), [r.as_dict() for r in rows]
    )


@budgets_router.post("", response_model=BudgetRead, status_code=201)
async def create_budget(body: BudgetCreate, admin: AdminDep, budgets: BudgetsDep) -> BudgetRead:
    """Create a budget; every process applies it to calls from when this answers."""
    budget = await budgets.create(
        name=body.name,
        description=body.description,
        scope=body.scope,
        scope_id=body.scope_id,
        period=body.period,
        hard_limit_micros=body.hard_limit_micros,
        soft_limit_micros=body.soft_limit_micros,
        model_ids=body.model_ids,
        alert_thresholds=body.alert_thresholds,
        enabled=body.enabled,
    )
    return BudgetRead.of(budget)


@budgets_router.get("", response_model=BudgetList)
async def list_budgets(
    admin: AdminDep,
    budgets: BudgetsDep,
    scope: BudgetScope | None = None,
    scope_id: str | None = Query(default=None, max_length=64),
    limit: PageLimit = 20,
    after: PageAfter = None,
) -> BudgetList:
    """Budgets, newest first."""
    page = await budgets.find(scope=scope, scope_id=scope_id, limit=limit, after=after)
    return BudgetList.of_page(page)


@budgets_router.get("/{budget_id}", response_model=BudgetRead)
async def get_budget(budget_id: str, admin: AdminDep, budgets: BudgetsDep) -> BudgetRead:
    """One budget with its recorded usage of the current period."""
    return BudgetRead.of(await budgets.get(budget_id))


@budgets_router.patch("/{budget_id}", response_model=BudgetRead)
async def update_budget(
    budget_id: str, body: BudgetUpdate, admin: AdminDep, budgets: BudgetsDep
) -> BudgetRead:
    """Change a budget; fields left out are kept."""
    given = body.model_fields_set
    budget = await budgets.update(
        budget_id,
        BudgetChanges(
            name=body.name,
            description=body.description,
            hard_limit_micros=body.hard_limit_micros,
            soft_limit_micros=body.soft_limit_micros,
            clear_soft_limit="soft_limit_micros" in given and body.soft_limit_micros is None,
            model_ids=body.model_ids,
            alert_thresholds=body.alert_thresholds,
            enabled=body.enabled,
        ),
    )
    return BudgetRead.of(budget)


@budgets_router.delete("/{budget_id}", response_model=Deleted)
async def delete_budget(budget_id: str, admin: AdminDep, budgets: BudgetsDep) -> Deleted:
    """Delete a budget."""
    await budgets.delete(budget_id)
    return Deleted(id=budget_id, object="budget")

"""The usage and budget admin API: aggregations in JSON and CSV, budgets, admin rights."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.config import Settings
from app.core.clock import utcnow
from app.main import create_app
from app.services import Services
from app.storage.protocol import Storage
from app.usage.entities import UsageRecord, UsageStatus, UsageType
from tests.fakes import RecordingQueue

ADMIN_KEY = "gw-usage-tests-admin-secret-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(autouse=True)
def _no_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def app_on(storage: Storage, **overrides: Any) -> FastAPI:
    values: dict[str, Any] = {"BROKER": "stub", "ADMIN_API_KEY": ADMIN_KEY}
    values.update(overrides)
    return create_app(Settings(**values), storage=storage, queue=RecordingQueue(storage))


@asynccontextmanager
async def serve(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield client


@pytest.fixture
async def client(storage: Storage) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(app_on(storage)) as client:
        yield client


def services_of(client: httpx.AsyncClient) -> Services:
    transport = client._transport
    assert isinstance(transport, httpx.ASGITransport)
    app: Any = transport.app
    services: Services = app.state.services
    return services


_n = iter(range(10**9))


def record(
    at: datetime, *, key: str, team: str, model: str, cost: int, error: bool = False
) -> UsageRecord:
    return UsageRecord(
        id=f"usage-{next(_n)}",
        created_at=at,
        usage_type=UsageType.CHAT_COMPLETION,
        api_key_id=key,
        team_id=team,
        model_id=model,
        input_tokens=10,
        output_tokens=5,
        cost_micros=cost,
        status=UsageStatus.ERROR if error else UsageStatus.SUCCESS,
    )


async def seed(services: Services) -> tuple[date, date]:
    today = utcnow().date()
    noon = datetime(today.year, today.month, today.day, 12, tzinfo=UTC)
    old = noon - timedelta(days=5)
    records = [
        record(noon, key="k1", team="t1", model="m1", cost=100),
        record(noon, key="k1", team="t1", model="m2", cost=200, error=True),
        record(noon, key="k2", team="t2", model="m1", cost=400),
        record(old, key="k1", team="t1", model="m1", cost=1000),
    ]
    async with services.storage.unit_of_work() as uow:
        await uow.repo(UsageRecord).add_many(records)
        await uow.commit()
    return old.date(), today


async def summary(client: httpx.AsyncClient, **params: str) -> dict[str, Any]:
    response = await client.get("/admin/usage/summary", params=params, headers=ADMIN)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_usage_is_aggregated_by_key_team_model_and_day(client: httpx.AsyncClient) -> None:
    old, today = await seed(services_of(client))
    span = {"start": old.isoformat(), "end": today.isoformat()}
    by_key = await summary(client, group_by="key", **span)
    assert [(g["group"], g["requests"], g["cost_micros"]) for g in by_key["data"]] == [
        ("k1", 3, 1300),
        ("k2", 1, 400),
    ]
    assert by_key["total"]["cost_micros"] == 1700 and by_key["total"]["errors"] == 1
    by_team = await summary(client, group_by="team", **span)
    assert [(g["group"], g["input_tokens"]) for g in by_team["data"]] == [("t1", 30), ("t2", 10)]
    by_model = await summary(client, group_by="model", **span, team_id="t1")
    assert [(g["group"], g["cost_micros"]) for g in by_model["data"]] == [
        ("m1", 1100),
        ("m2", 200),
    ]
    by_day = await summary(client, group_by="day", **span)
    assert [(g["group"], g["requests"]) for g in by_day["data"]] == [
        (old.isoformat(), 1),
        (today.isoformat(), 3),
    ]


async def test_usage_summary_as_csv(client: httpx.AsyncClient) -> None:
    old, _ = await seed(services_of(client))
    response = await client.get(
        "/admin/usage/summary",
        params={"group_by": "model", "start": old.isoformat(), "format": "csv"},
        headers=ADMIN,
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert [(r["group"], r["requests"], r["cost_micros"]) for r in rows] == [
        ("m1", "3", "1500"),
        ("m2", "1", "200"),
    ]


async def test_rolled_up_days_keep_their_totals_after_retention(
    client: httpx.AsyncClient,
) -> None:
    services = services_of(client)
    old, today = await seed(services)
    span = {"start": old.isoformat(), "end": today.isoformat()}
    before = await summary(client, group_by="key", **span)
    deleted = await services.accounting.usage.purge_expired(retention_days=3)
    assert deleted == 1  # the record of five days ago; today's stay
    after = await summary(client, group_by="key", **span)
    assert after["data"] == before["data"]
    records = await client.get("/admin/usage", headers=ADMIN)
    assert len(records.json()["data"]) == 3


async def test_bad_ranges_and_groupings_are_400_naming_the_field(
    client: httpx.AsyncClient,
) -> None:
    bad_group = await client.get("/admin/usage/summary?group_by=colour", headers=ADMIN)
    assert bad_group.status_code == 400 and bad_group.json()["error"]["param"] == "group_by"
    reversed_range = await client.get(
        "/admin/usage/summary?start=2026-02-10&end=2026-02-01", headers=ADMIN
    )
    assert reversed_range.status_code == 400
    assert reversed_range.json()["error"]["param"] == "end"
    for edge in ("end=0001-01-01", "end=9999-12-31", "start=9999-12-31&end=9999-12-31"):
        beyond = await client.get(f"/admin/usage/summary?{edge}", headers=ADMIN)
        assert beyond.status_code == 400, (edge, beyond.text)
        assert beyond.json()["error"]["param"] in ("start", "end")


async def test_budgets_are_created_updated_listed_and_deleted(client: httpx.AsyncClient) -> None:
    created = await client.post(
        "/admin/budgets",
        json={
            "name": "team a",
            "scope": "team",
            "scope_id": "team-a",
            "period": "weekly",
            "hard_limit_micros": 5_000_000,
            "soft_limit_micros": 4_000_000,
        },
        headers=ADMIN,
    )
    assert created.status_code == 201, created.text
    budget = created.json()
    assert budget["alert_thresholds"] == [50, 80, 100] and budget["current_usage_micros"] == 0
    assert budget["period_end"] is not None
    patched = await client.patch(
        f"/admin/budgets/{budget['id']}",
        json={"hard_limit_micros": 9_000_000, "soft_limit_micros": None},
        headers=ADMIN,
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["hard_limit_micros"] == 9_000_000
    assert patched.json()["soft_limit_micros"] is None
    listed = await client.get("/admin/budgets?scope=team", headers=ADMIN)
    assert [b["id"] for b in listed.json()["data"]] == [budget["id"]]
    deleted = await client.delete(f"/admin/budgets/{budget['id']}", headers=ADMIN)
    assert deleted.json() == {"id": budget["id"], "object": "budget", "deleted": True}
    gone = await client.get(f"/admin/budgets/{budget['id']}", headers=ADMIN)
    assert gone.status_code == 404


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"name": "x", "scope": "team", "hard_limit_micros": 1}, "scope_id"),
        ({"name": "x", "scope_id": "k", "hard_limit_micros": 1}, "scope_id"),
        ({"name": "x", "hard_limit_micros": -1}, "hard_limit_micros"),
        ({"name": "x", "hard_limit_micros": 10**40}, "hard_limit_micros"),
        ({"name": "x", "hard_limit_micros": 10, "soft_limit_micros": 20}, "soft_limit_micros"),
        ({"name": "x", "hard_limit_micros": 10, "alert_thresholds": [0]}, "alert_thresholds"),
        ({"name": "x", "hard_limit_micros": 10, "period": "hourly"}, "period"),
    ],
)
async def test_invalid_budgets_are_400_naming_the_field(
    client: httpx.AsyncClient, body: dict[str, Any], param: str
) -> None:
    response = await client.post("/admin/budgets", json=body, headers=ADMIN)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


async def test_accounting_routes_need_an_admin_key(client: httpx.AsyncClient) -> None:
    _, secret = await services_of(client).keys.create_key(name="plain")
    plain = {"Authorization": f"Bearer {secret}"}
    for path in ("/admin/usage", "/admin/usage/summary", "/admin/budgets", "/admin/logs"):
        assert (await client.get(path)).status_code == 401
        assert (await client.get(path, headers=plain)).status_code == 403

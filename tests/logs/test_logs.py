"""Execution logs: written with usage, bodies only when configured, filters, stats, retention."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.config import Settings
from app.core.clock import utcnow
from app.credentials.entities import Provider
from app.logs.entities import ExecutionLog, ExecutionStatus, ExecutionType
from app.models.entities import Model
from app.services import Services
from app.storage.protocol import Storage
from app.usage.entities import UsageStatus
from app.usage.settlement import UsageOutcome
from tests.usage.conftest import Principal
from tests.usage.test_api import ADMIN, app_on, serve, services_of

BODY = {"messages": [{"role": "user", "content": "secret plans"}]}


@pytest.fixture(autouse=True)
def _no_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
async def client(storage: Storage) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(app_on(storage, METERING_CACHE_SECONDS=0)) as client:
        yield client


async def call(services: Services, *, key: str = "key-1", fail: bool = False) -> None:
    model = Model(
        id="priced",
        name="Priced",
        provider=Provider.MOCK,
        provider_model="mock",
        input_price_per_million=Decimal("1"),
    )
    admission = await services.metering.admit(Principal(key), model, 10, 10)
    await services.metering.settle(
        admission,
        UsageOutcome(
            status=UsageStatus.ERROR if fail else UsageStatus.SUCCESS,
            input_tokens=10,
            output_tokens=0 if fail else 4,
            error="upstream said no" if fail else None,
            request_body=BODY,
            response_body={"choices": []},
            latency_ms=25 if fail else 75,
        ),
    )


async def logs(client: httpx.AsyncClient, **params: Any) -> dict[str, Any]:
    response = await client.get("/admin/logs", params=params, headers=ADMIN)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_every_call_is_logged_without_bodies_by_default(client: httpx.AsyncClient) -> None:
    await call(services_of(client))
    (entry,) = (await logs(client))["data"]
    assert entry["resource_id"] == "priced" and entry["status"] == "success"
    assert entry["execution_type"] == "chat_completion"
    assert (entry["input_tokens"], entry["output_tokens"], entry["cost_micros"]) == (10, 4, 10)
    assert entry["input"] is None and entry["output"] is None
    assert (
        "secret plans" not in (await client.get(f"/admin/logs/{entry['id']}", headers=ADMIN)).text
    )


async def test_bodies_are_logged_once_the_configuration_allows_it(
    client: httpx.AsyncClient,
) -> None:
    services = services_of(client)
    await services.config.update({"logging.log_request_bodies": True})
    await call(services)
    (entry,) = (await logs(client))["data"]
    assert entry["input"] == BODY and entry["output"] == {"choices": []}


async def test_logs_are_filtered_and_paged_with_a_cursor(client: httpx.AsyncClient) -> None:
    services = services_of(client)
    for n in range(5):
        await call(services, key=f"key-{n % 2}", fail=n == 4)
    failed = await logs(client, status="failed")
    assert [e["error"] for e in failed["data"]] == ["upstream said no"]
    mine = await logs(client, api_key_id="key-1", type="chat_completion")
    assert len(mine["data"]) == 2
    first = await logs(client, limit=3)
    second = await logs(client, limit=3, after=first["next_cursor"])
    ids = [e["id"] for e in first["data"] + second["data"]]
    assert len(ids) == len(set(ids)) == 5 and second["next_cursor"] is None
    future = (utcnow() + timedelta(hours=1)).isoformat()
    assert (await logs(client, start=future))["data"] == []
    bad = await client.get("/admin/logs?status=exploded", headers=ADMIN)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "status"


async def test_statistics_count_by_status_and_total_tokens(client: httpx.AsyncClient) -> None:
    services = services_of(client)
    await call(services)
    await call(services)
    await call(services, fail=True)
    response = await client.get("/admin/logs/stats", headers=ADMIN)
    stats = response.json()
    assert stats["total"] == 3
    assert stats["by_status"] == {"success": 2, "failed": 1}
    assert stats["input_tokens"] == 30 and stats["output_tokens"] == 8
    assert stats["average_execution_time_ms"] == pytest.approx((75 + 75 + 25) / 3)
    assert stats["max_execution_time_ms"] == 75


async def test_retention_deletes_only_logs_older_than_the_period(
    client: httpx.AsyncClient, storage: Storage
) -> None:
    services = services_of(client)
    old = ExecutionLog(
        id="log-old",
        execution_type=ExecutionType.CHAT_COMPLETION,
        resource_id="priced",
        status=ExecutionStatus.SUCCESS,
        created_at=utcnow() - timedelta(days=31),
    )
    async with services.storage.unit_of_work() as uow:
        await uow.repo(ExecutionLog).add(old)
        await uow.commit()
    await call(services)
    assert await services.accounting.logs.purge_expired(30) == 1
    remaining = (await logs(client))["data"]
    assert len(remaining) == 1 and remaining[0]["id"] != "log-old"

"""App configuration: typed settings with defaults, validated updates, cached reads."""

from __future__ import annotations

import httpx

from app.storage.protocol import Storage
from tests.access.conftest import ADMIN, app_on, serve, services_of


async def test_every_setting_is_listed_with_its_default(client: httpx.AsyncClient) -> None:
    listed = (await client.get("/admin/config", headers=ADMIN)).json()["data"]
    by_key = {item["key"]: item for item in listed}
    bodies = by_key["logging.log_request_bodies"]
    assert bodies["value"] is False and bodies["is_default"] and bodies["category"] == "logging"
    assert by_key["retention.logs_days"]["value_type"] == "integer"
    retention = (await client.get("/admin/config?category=retention", headers=ADMIN)).json()
    assert {item["category"] for item in retention["data"]} == {"retention"}


async def test_updates_keep_the_type_and_range_or_answer_400_naming_the_setting(
    client: httpx.AsyncClient,
) -> None:
    for key, value in (
        ("retention.logs_days", "7"),
        ("retention.logs_days", 7.5),
        ("retention.logs_days", True),
        ("retention.logs_days", 0),
        ("logging.log_request_bodies", 1),
        ("logging.log_request_bodies", None),
    ):
        response = await client.put(f"/admin/config/{key}", json={"value": value}, headers=ADMIN)
        assert response.status_code == 400, (key, value, response.text)
        assert response.json()["error"]["param"] == key
        assert key in response.json()["error"]["message"]
    unknown = await client.put("/admin/config/no.such", json={"value": 1}, headers=ADMIN)
    assert unknown.status_code == 404
    ok = await client.put("/admin/config/retention.logs_days", json={"value": 7}, headers=ADMIN)
    assert ok.status_code == 200 and ok.json()["value"] == 7 and not ok.json()["is_default"]
    assert await services_of(client).config.get("retention.logs_days") == 7


async def test_a_bulk_update_writes_nothing_unless_every_value_is_valid(
    client: httpx.AsyncClient,
) -> None:
    body = {"values": {"logging.log_request_bodies": True, "retention.usage_days": 1}}
    refused = await client.patch("/admin/config", json=body, headers=ADMIN)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "retention.usage_days"
    config = services_of(client).config
    assert await config.get("logging.log_request_bodies") is False
    body["values"]["retention.usage_days"] = 60
    assert (await client.patch("/admin/config", json=body, headers=ADMIN)).status_code == 200
    assert await config.get("logging.log_request_bodies") is True
    reset = await client.delete("/admin/config/logging.log_request_bodies", headers=ADMIN)
    assert reset.json()["value"] is False and reset.json()["is_default"]
    assert await config.get("logging.log_request_bodies") is False


async def test_environment_settings_are_the_defaults(storage: Storage) -> None:
    async with serve(app_on(storage, LOG_RETENTION_DAYS=9)) as client:
        assert await services_of(client).config.get("retention.logs_days") == 9
        shown = await client.get("/admin/config/retention.logs_days", headers=ADMIN)
        assert shown.json()["default"] == 9


async def test_values_persist_across_restarts(storage: Storage) -> None:
    async with serve(app_on(storage)) as first:
        await first.put("/admin/config/cache.ttl_seconds", json={"value": 60}, headers=ADMIN)
    async with serve(app_on(storage)) as second:
        assert await services_of(second).config.get("cache.ttl_seconds") == 60

"""The webhook admin API: admin rights, secrets shown once, 4xx errors naming the field."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI

from app.config import Settings
from app.main import create_app
from app.operations.runner import OperationRunner
from app.services import Services, build_handlers
from app.storage.memory import MemoryStorage
from tests.fakes import RecordingQueue
from tests.webhooks.receiver import Receiver, verify

ADMIN = "gw-admin-secret-for-webhook-tests-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture
async def app() -> AsyncIterator[FastAPI]:
    settings = Settings(BROKER="stub", ADMIN_API_KEY=ADMIN, OUTBOUND_ALLOWED_HOSTS="127.0.0.1")
    storage = MemoryStorage()
    application = create_app(settings, storage=storage, queue=RecordingQueue(storage))
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
        yield c


def services_of(app: FastAPI) -> Services:
    services: Services = app.state.services
    return services


async def ordinary_key(app: FastAPI) -> dict[str, str]:
    _, secret = await services_of(app).keys.create_key(name="client", admin=False)
    return {"Authorization": f"Bearer {secret}"}


async def create(client: httpx.AsyncClient, **body: object) -> dict[str, object]:
    response = await client.post(
        "/admin/webhooks", json={"url": "https://hooks.example.com/in", **body}, headers=AUTH
    )
    assert response.status_code == 201, response.text
    created: dict[str, object] = response.json()
    return created


async def test_every_webhook_route_requires_admin_rights(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    ordinary = await ordinary_key(app)
    paths = (await client.get("/openapi.json")).json()["paths"]
    routes = [
        (method.upper(), path)
        for path, operations in paths.items()
        if path.startswith("/admin/webhooks")
        for method in operations
    ]
    assert len(routes) >= 11
    for method, template in routes:
        path = template.replace("{webhook_id}", "wh-00000000-0000-4000-8000-000000000000")
        path = path.replace("{delivery_id}", "dlv-00000000-0000-4000-8000-000000000000")
        assert (await client.request(method, path)).status_code == 401, (method, path)
        denied = await client.request(method, path, headers=ordinary)
        assert denied.status_code == 403, (method, path)


async def test_the_secret_is_shown_at_creation_and_rotation_only(client: httpx.AsyncClient) -> None:
    created = await create(client, events=["operation.*"], name="orders")
    secret = str(created["secret"])
    assert secret.startswith("whsec_") and created["enabled"] is True
    webhook_id = created["id"]
    shown = await client.get(f"/admin/webhooks/{webhook_id}", headers=AUTH)
    listed = await client.get("/admin/webhooks", headers=AUTH)
    assert shown.status_code == 200 and "secret" not in shown.json()
    assert secret not in shown.text and secret not in listed.text
    assert [w["id"] for w in listed.json()["data"]] == [webhook_id]
    rotated = await client.post(f"/admin/webhooks/{webhook_id}/rotate-secret", headers=AUTH)
    assert rotated.status_code == 200
    assert rotated.json()["secret"] != secret and rotated.json()["previous_secret_expires_at"]
    assert rotated.json()["secret"] not in (await client.get("/admin/webhooks", headers=AUTH)).text


async def test_header_values_are_never_shown_only_their_names(
    client: httpx.AsyncClient,
) -> None:
    token = "Bearer hook-token-0123456789"
    created = await create(client, headers={"Authorization": token})
    path = f"/admin/webhooks/{created['id']}"
    shown = await client.get(path, headers=AUTH)
    listed = await client.get("/admin/webhooks", headers=AUTH)
    changed = await client.patch(
        path, json={"headers": {"Authorization": "***", "X-Tenant": "acme"}}, headers=AUTH
    )
    for response in (shown, listed, changed):
        assert response.status_code == 200, response.text
        assert "hook-token" not in response.text
    assert created["headers"] == {"Authorization": "***"}
    assert shown.json()["headers"] == {"Authorization": "***"}
    assert listed.json()["data"][0]["headers"] == {"Authorization": "***"}
    assert changed.json()["headers"] == {"Authorization": "***", "X-Tenant": "***"}
    unknown = await client.patch(path, json={"headers": {"X-Other": "***"}}, headers=AUTH)
    assert unknown.status_code == 400
    assert unknown.json()["error"]["param"] == "headers.X-Other"


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"url": "ftp://example.com/x"}, "url", "invalid_request"),
        ({"url": "not a url"}, "url", "invalid_request"),
        ({"url": "http://169.254.169.254/latest"}, "url", "forbidden_destination"),
        ({"url": "http://[::ffff:10.0.0.1]/"}, "url", "forbidden_destination"),
        ({"url": "http://user:pw@example.com/"}, "url", "invalid_request"),
        ({"url": "https://e.com", "events": ["nope.created"]}, "events.0", "invalid_request"),
        ({"url": "https://e.com", "headers": {"Webhook-Id": "x"}}, "headers.Webhook-Id", None),
        ({"url": "https://e.com", "headers": {"bad name": "x"}}, "headers.bad name", None),
        ({"url": "https://e.com", "secret": "plain"}, "secret", "invalid_request"),
        ({"url": "https://e.com", "colour": "red"}, "colour", "extra_forbidden"),
        ({"events": []}, "url", "missing"),
    ],
)
async def test_bad_subscriptions_are_400_naming_the_field(
    client: httpx.AsyncClient, body: dict[str, object], param: str, code: str | None
) -> None:
    response = await client.post("/admin/webhooks", json=body, headers=AUTH)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    if code is not None:
        assert error["code"] == code


async def test_unknown_and_malformed_ids_are_404_and_400(client: httpx.AsyncClient) -> None:
    missing = await client.get(
        "/admin/webhooks/wh-00000000-0000-4000-8000-000000000000", headers=AUTH
    )
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "webhook_id"
    malformed = await client.get("/admin/webhooks/whatever", headers=AUTH)
    assert malformed.status_code == 400 and malformed.json()["error"]["param"] == "webhook_id"
    created = await create(client)
    bad_range = await client.post(
        f"/admin/webhooks/{created['id']}/replay",
        json={"since": "2026-01-01T00:00:00"},
        headers=AUTH,
    )
    assert bad_range.status_code == 400 and bad_range.json()["error"]["param"] == "since"
    bad_status = await client.get(
        f"/admin/webhooks/{created['id']}/deliveries?status=exploded", headers=AUTH
    )
    assert bad_status.status_code == 400 and bad_status.json()["error"]["param"] == "status"


async def test_disabling_and_re_enabling_through_patch(client: httpx.AsyncClient) -> None:
    created = await create(client)
    path = f"/admin/webhooks/{created['id']}"
    paused = await client.patch(path, json={"enabled": False, "description": "x"}, headers=AUTH)
    assert paused.json()["status"] == "paused" and paused.json()["enabled"] is False
    assert paused.json()["description"] == "x"
    resumed = await client.patch(path, json={"enabled": True, "events": ["budget.*"]}, headers=AUTH)
    assert resumed.json()["status"] == "active" and resumed.json()["events"] == ["budget.*"]
    deleted = await client.delete(path, headers=AUTH)
    assert deleted.json() == {"id": created["id"], "object": "webhook", "deleted": True}
    assert (await client.get(path, headers=AUTH)).status_code == 404


async def test_the_event_catalogue_lists_every_type(client: httpx.AsyncClient) -> None:
    response = await client.get("/admin/webhooks/event-types", headers=AUTH)
    names = {e["name"] for e in response.json()["data"]}
    assert {
        "operation.completed",
        "operation.failed",
        "operation.cancelled",
        "batch.completed",
        "budget.threshold_reached",
        "budget.exceeded",
        "api_key.created",
        "api_key.revoked",
        "webhook.ping",
    } <= names


async def test_a_ping_is_delivered_by_the_workers_handler_and_logged(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    receiver = await Receiver().start()
    try:
        created = await create(client, url=receiver.url, events=["budget.exceeded"])
        pinged = await client.post(f"/admin/webhooks/{created['id']}/ping", headers=AUTH)
        assert pinged.status_code == 202 and pinged.json()["status"] == "pending"
        services = services_of(app)
        queue = services.queue
        assert isinstance(queue, RecordingQueue)
        runner = OperationRunner(services.storage, queue, build_handlers(services))
        for sent in list(queue.sent):
            await runner.execute(sent.operation_id)
    finally:
        await receiver.close()
    (request,) = receiver.requests
    verify(str(created["secret"]), request.headers, request.body)
    log = await client.get(f"/admin/webhooks/{created['id']}/deliveries", headers=AUTH)
    (delivery,) = log.json()["data"]
    assert delivery["event_type"] == "webhook.ping" and delivery["status"] == "succeeded"
    assert delivery["attempt_log"][0]["status_code"] == 200
    one = await client.get(
        f"/admin/webhooks/{created['id']}/deliveries/{delivery['id']}", headers=AUTH
    )
    assert one.json()["event_id"] == request.headers["webhook-id"]
    failed_only = await client.get(
        f"/admin/webhooks/{created['id']}/deliveries?status=failed", headers=AUTH
    )
    assert failed_only.json()["data"] == []
    replay = await client.post(
        f"/admin/webhooks/{created['id']}/deliveries/{delivery['id']}/replay", headers=AUTH
    )
    assert replay.status_code == 202 and replay.json()["status"] == "pending"


async def test_cancelling_a_job_through_the_api_records_an_operation_cancelled_delivery(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    created = await create(client, events=["operation.cancelled"])
    accepted = await client.post(
        "/v1/chat/completions?async=true",
        json={"model": "mock", "messages": [{"role": "user", "content": "hi"}]},
        headers=AUTH,
    )
    assert accepted.status_code == 202, accepted.text
    operation_id = accepted.json()["operation_id"]
    assert (await client.delete(f"/v1/operations/{operation_id}", headers=AUTH)).status_code == 200
    log = await client.get(f"/admin/webhooks/{created['id']}/deliveries", headers=AUTH)
    (delivery,) = log.json()["data"]
    assert delivery["event_type"] == "operation.cancelled"
    assert delivery["payload"]["data"]["operation"]["id"] == operation_id
    assert delivery["payload"]["data"]["operation"]["status"] == "cancelled"

"""The operations HTTP API: shapes, scoping, errors and admin rights."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app

ADMIN = "gw-admin-secret-for-api-tests-0123456789"


@pytest.fixture
def client() -> Iterator[TestClient]:
    settings = Settings(BROKER="stub", ADMIN_API_KEY=ADMIN)  # type: ignore[arg-type]
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def key_for(client: TestClient, *, admin: bool = False) -> dict[str, str]:
    keys = client.app.state.services.keys  # type: ignore[attr-defined]
    _, secret = asyncio.run(keys.create_key(name="client", admin=admin))
    return {"Authorization": f"Bearer {secret}"}


def submit(client: TestClient, headers: dict[str, str], **extra: str) -> str:
    response = client.post(
        "/v1/chat/completions?async=true",
        json={"model": "mock", "messages": [{"role": "user", "content": "hi"}]},
        headers={**headers, **extra},
    )
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "pending" and body["operation_id"].startswith("op-")
    return str(body["operation_id"])


def test_an_accepted_job_can_be_polled_by_its_owner(client: TestClient) -> None:
    alice = key_for(client)
    operation_id = submit(client, alice)
    polled = client.get(f"/v1/operations/{operation_id}", headers=alice)
    assert polled.status_code == 200
    assert polled.json()["status"] == "pending" and polled.json()["kind"] == "chat_completion"
    assert "lease_token" not in polled.text


def test_unknown_foreign_and_malformed_ids_are_404_404_400(client: TestClient) -> None:
    alice, bob = key_for(client), key_for(client)
    operation_id = submit(client, alice)
    unknown = client.get("/v1/operations/op-00000000-0000-4000-8000-000000000000", headers=alice)
    assert unknown.status_code == 404
    assert unknown.json()["error"]["type"] == "not_found_error"
    assert client.get(f"/v1/operations/{operation_id}", headers=bob).status_code == 404
    assert client.delete(f"/v1/operations/{operation_id}", headers=bob).status_code == 404
    malformed = client.get("/v1/operations/not-an-id", headers=alice)
    assert malformed.status_code == 400 and malformed.json()["error"]["param"] == "id"


def test_listing_by_ids_and_by_filters_shows_only_the_callers_jobs(client: TestClient) -> None:
    alice, bob = key_for(client), key_for(client)
    mine = [submit(client, alice) for _ in range(3)]
    theirs = submit(client, bob)
    by_ids = client.get(f"/v1/operations?ids={mine[0]},{theirs},{mine[2]}", headers=alice)
    assert [o["id"] for o in by_ids.json()["data"]] == [mine[0], mine[2]]
    client.delete(f"/v1/operations/{mine[1]}", headers=alice)
    cancelled = client.get("/v1/operations?status=cancelled", headers=alice).json()
    assert [o["id"] for o in cancelled["data"]] == [mine[1]]
    first = client.get("/v1/operations?limit=2", headers=alice).json()
    assert first["has_more"] and len(first["data"]) == 2
    rest = client.get(f"/v1/operations?limit=2&after={first['next_cursor']}", headers=alice).json()
    assert {o["id"] for o in first["data"] + rest["data"]} == set(mine)
    assert client.get("/v1/operations?status=exploded", headers=alice).status_code == 400


def test_idempotency_key_replays_or_conflicts(client: TestClient) -> None:
    alice = key_for(client)
    first = submit(client, alice, **{"Idempotency-Key": "abc"})
    assert submit(client, alice, **{"Idempotency-Key": "abc"}) == first
    different = client.post(
        "/v1/chat/completions?async=true",
        json={"model": "mock", "messages": [{"role": "user", "content": "other"}]},
        headers={**alice, "Idempotency-Key": "abc"},
    )
    assert different.status_code == 409


def test_an_unknown_model_is_refused_before_a_job_is_made(client: TestClient) -> None:
    alice = key_for(client)
    response = client.post(
        "/v1/chat/completions?async=true",
        json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]},
        headers=alice,
    )
    assert response.status_code == 404 and response.json()["error"]["param"] == "model"
    assert client.get("/v1/operations", headers=alice).json()["data"] == []


def test_requests_without_a_valid_key_are_401(client: TestClient) -> None:
    assert client.get("/v1/operations").status_code == 401
    bad = client.get("/v1/operations", headers={"Authorization": "Bearer gw-wrong-key-123456789"})
    assert bad.status_code == 401 and bad.json()["error"]["type"] == "authentication_error"


def test_every_admin_route_requires_admin_rights(client: TestClient) -> None:
    ordinary = key_for(client)
    paths = client.get("/openapi.json").json()["paths"]
    admin_routes = [
        (m.upper(), p) for p, ops in paths.items() if p.startswith("/admin") for m in ops
    ]
    assert len(admin_routes) >= 2
    for method, template in admin_routes:
        path = template.replace("{operation_id}", "op-00000000-0000-4000-8000-000000000000")
        assert client.request(method, path).status_code == 401, (method, path)
        assert client.request(method, path, headers=ordinary).status_code == 403


def test_admins_list_every_owner_and_retry_failed_jobs(client: TestClient) -> None:
    alice, admin = key_for(client), {"Authorization": f"Bearer {ADMIN}"}
    submit(client, alice)
    submit(client, key_for(client))
    everyone = client.get("/admin/operations", headers=admin).json()
    assert len(everyone["data"]) == 2
    pending = everyone["data"][0]["id"]
    conflict = client.post(f"/admin/operations/{pending}/retry", headers=admin)
    assert conflict.status_code == 409  # only failed jobs can be retried

"""API keys: shown once, never listed with their secret, suspended, activated, revoked, expired."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import httpx

from app.access.entities import ApiKey
from app.access.service import ApiKeyService
from app.core.clock import utcnow
from app.storage.protocol import Storage, UnitOfWork
from tests.access.conftest import ADMIN, new_key, services_of

CHAT = {"model": "mock", "messages": [{"role": "user", "content": "hi"}]}


async def can_call(client: httpx.AsyncClient, headers: dict[str, str]) -> int:
    return (await client.get("/v1/operations", headers=headers)).status_code


async def test_the_secret_is_shown_at_creation_only(client: httpx.AsyncClient) -> None:
    created = await client.post("/admin/keys", json={"name": "ci"}, headers=ADMIN)
    assert created.status_code == 201
    secret = created.json()["key"]
    assert secret.startswith("gw-") and len(secret) >= 46
    assert created.json()["key_prefix"] == secret[:12]
    key_id = created.json()["id"]
    one = await client.get(f"/admin/keys/{key_id}", headers=ADMIN)
    listed = await client.get("/admin/keys", headers=ADMIN)
    for text in (one.text, listed.text):
        assert secret not in text and "secret_hash" not in text and "sha256$" not in text
    assert "key" not in one.json()
    assert key_id in [k["id"] for k in listed.json()["data"]]


async def test_suspend_activate_and_revoke_take_effect_at_once(client: httpx.AsyncClient) -> None:
    key_id, headers = await new_key(client)
    assert await can_call(client, headers) == 200
    suspended = await client.post(f"/admin/keys/{key_id}/suspend", headers=ADMIN)
    assert suspended.json()["status"] == "suspended"
    refused = await client.get("/v1/operations", headers=headers)
    assert refused.status_code == 401 and "suspended" in refused.json()["error"]["message"]
    await client.post(f"/admin/keys/{key_id}/activate", headers=ADMIN)
    assert await can_call(client, headers) == 200
    revoked = await client.post(f"/admin/keys/{key_id}/revoke", headers=ADMIN)
    assert revoked.json()["status"] == "revoked"
    assert await can_call(client, headers) == 401
    again = await client.post(f"/admin/keys/{key_id}/activate", headers=ADMIN)
    assert again.status_code == 409
    assert await can_call(client, headers) == 401


async def test_an_expired_key_is_refused_and_listed_as_expired(client: httpx.AsyncClient) -> None:
    soon = (utcnow() + timedelta(hours=1)).isoformat()
    key_id, headers = await new_key(client, expires_at=soon)
    assert await can_call(client, headers) == 200
    past = (utcnow() - timedelta(seconds=1)).isoformat()
    await client.patch(f"/admin/keys/{key_id}", json={"expires_at": past}, headers=ADMIN)
    refused = await client.get("/v1/operations", headers=headers)
    assert refused.status_code == 401 and "expired" in refused.json()["error"]["message"]
    shown = await client.get(f"/admin/keys/{key_id}", headers=ADMIN)
    assert shown.json()["status"] == "expired"


async def test_bad_key_input_is_400_naming_the_field(client: httpx.AsyncClient) -> None:
    past = (utcnow() - timedelta(days=1)).isoformat()
    cases: list[tuple[dict[str, Any], str]] = [
        ({"name": "x", "expires_at": past}, "expires_at"),
        ({"name": "x", "permissions": {"models": "some"}}, "permissions.models"),
        ({"name": "x", "rate_limits": {"requests_per_minute": -1}}, "rate_limits"),
        ({"name": "x", "rate_limits": {"requests_per_hour": 5}}, "rate_limits"),
        ({"name": ""}, "name"),
        ({"name": "x", "team_id": "team-nope"}, "team_id"),
    ]
    for body, field in cases:
        response = await client.post("/admin/keys", json=body, headers=ADMIN)
        assert response.status_code in (400, 404), (body, response.text)
        assert (response.json()["error"]["param"] or "").startswith(field), response.text
    missing = await client.post("/admin/keys/key-nope/revoke", headers=ADMIN)
    assert missing.status_code == 404


async def test_an_update_changes_what_the_key_may_do(client: httpx.AsyncClient) -> None:
    key_id, headers = await new_key(client)
    changed = await client.patch(
        f"/admin/keys/{key_id}",
        json={"name": "renamed", "permissions": {"admin": True}},
        headers=ADMIN,
    )
    assert changed.status_code == 200 and changed.json()["name"] == "renamed"
    assert (await client.get("/admin/keys", headers=headers)).status_code == 200
    await client.patch(f"/admin/keys/{key_id}", json={"permissions": {}}, headers=ADMIN)
    assert (await client.get("/admin/keys", headers=headers)).status_code == 403


async def test_keys_of_a_suspended_team_stop_working(client: httpx.AsyncClient) -> None:
    team = (await client.post("/admin/teams", json={"name": "A"}, headers=ADMIN)).json()
    _, headers = await new_key(client, team_id=team["id"])
    assert await can_call(client, headers) == 200
    await client.post(f"/admin/teams/{team['id']}/suspend", headers=ADMIN)
    assert await can_call(client, headers) == 401
    await client.post(f"/admin/teams/{team['id']}/activate", headers=ADMIN)
    assert await can_call(client, headers) == 200


async def test_last_used_is_written_once_per_minute_not_per_request(
    client: httpx.AsyncClient,
) -> None:
    key_id, headers = await new_key(client)
    for _ in range(5):
        assert await can_call(client, headers) == 200
    keys = services_of(client).keys
    await keys.close()
    first = await keys.get_key(key_id)
    assert first.last_used_at is not None
    for _ in range(5):
        await can_call(client, headers)
    await keys.close()
    assert (await keys.get_key(key_id)).version == first.version


class RecordingSink:
    def __init__(self) -> None:
        self.events: list[tuple[UnitOfWork, str, dict[str, Any]]] = []

    async def record(self, uow: UnitOfWork, event_type: str, data: dict[str, Any]) -> None:
        self.events.append((uow, event_type, data))

    async def interested(self, event_type: str) -> bool:
        return True


async def test_creation_and_revocation_emit_events_in_their_transaction(
    storage: Storage,
) -> None:
    sink = RecordingSink()
    keys = ApiKeyService(storage, events=sink)
    key, secret = await keys.create_key(name="evented", created_by="admin")
    await keys.revoke_key(key.id, revoked_by="admin")
    await keys.revoke_key(key.id, revoked_by="admin")  # already revoked: no second event
    assert [(t, d["id"]) for _, t, d in sink.events] == [
        ("api_key.created", key.id),
        ("api_key.revoked", key.id),
    ]
    assert all(secret not in str(d) for _, _, d in sink.events)
    async with storage.unit_of_work() as uow:
        stored = await uow.repo(ApiKey).get(key.id)
    assert stored is not None and stored.secret_hash != secret and secret not in str(stored)


async def test_concurrent_requests_with_an_uncached_key_share_one_read(
    client: httpx.AsyncClient,
) -> None:
    key_id, headers = await new_key(client)
    keys = services_of(client).keys
    secret = headers["Authorization"].removeprefix("Bearer ")
    reads = 0
    original = keys._read

    async def counting(prefix: str) -> Any:
        nonlocal reads
        reads += 1
        return await original(prefix)

    keys._read = counting  # type: ignore[method-assign]
    keys.invalidate_all()
    principals = await asyncio.gather(*(keys.authenticate(secret) for _ in range(20)))
    assert reads == 1
    assert {p.key_id for p in principals} == {key_id}
    await keys.revoke_key(key_id)
    assert await can_call(client, headers) == 401  # the shared read never outlives a change


async def test_processes_ensuring_one_key_together_all_get_it_and_one_row_is_written(
    storage: Storage,
) -> None:
    # Replicas starting at once each ensure ADMIN_API_KEY: none may fail on another's insert.
    services = [ApiKeyService(storage) for _ in range(8)]
    secret = "gw-ensured-together-0123456789abcdefghijklmnop"
    keys = await asyncio.gather(
        *(s.ensure_key(key_id="ensured", name="admin", secret=secret, admin=True) for s in services)
    )
    assert {k.id for k in keys} == {"ensured"}
    async with storage.unit_of_work() as uow:
        assert await uow.repo(ApiKey).count() == 1
    assert (await services[0].authenticate(secret)).key_id == "ensured"
    rotated = secret.replace("together", "rotated!")
    await asyncio.gather(
        *(
            s.ensure_key(key_id="ensured", name="admin", secret=rotated, admin=True)
            for s in services
        )
    )
    assert (await ApiKeyService(storage).authenticate(rotated)).key_id == "ensured"

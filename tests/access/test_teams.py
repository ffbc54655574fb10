"""Teams: members and roles, and the rules that keep the administrators team and owners."""

from __future__ import annotations

import httpx

from app.access.teams import ADMIN_TEAM_ID
from tests.access.conftest import ADMIN, new_key


async def new_user(client: httpx.AsyncClient, name: str) -> str:
    created = await client.post(
        "/admin/users", json={"username": name, "password": f"{name}-password"}, headers=ADMIN
    )
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


async def test_the_administrators_team_exists_with_the_first_admin_as_owner(
    client: httpx.AsyncClient,
) -> None:
    team = (await client.get(f"/admin/teams/{ADMIN_TEAM_ID}", headers=ADMIN)).json()
    assert team["builtin"] is True and team["status"] == "active"
    members = (await client.get(f"/admin/teams/{ADMIN_TEAM_ID}/members", headers=ADMIN)).json()
    assert [m["role"] for m in members["data"]] == ["owner"]


async def test_the_administrators_team_cannot_be_suspended_or_deleted(
    client: httpx.AsyncClient,
) -> None:
    suspend = await client.post(f"/admin/teams/{ADMIN_TEAM_ID}/suspend", headers=ADMIN)
    delete = await client.delete(f"/admin/teams/{ADMIN_TEAM_ID}", headers=ADMIN)
    assert suspend.status_code == delete.status_code == 409
    team = (await client.get(f"/admin/teams/{ADMIN_TEAM_ID}", headers=ADMIN)).json()
    assert team["status"] == "active"


async def test_members_roles_and_the_last_owner(client: httpx.AsyncClient) -> None:
    team = (await client.post("/admin/teams", json={"name": "Search"}, headers=ADMIN)).json()
    ann, ben = await new_user(client, "ann"), await new_user(client, "ben")
    members = f"/admin/teams/{team['id']}/members"
    added = await client.post(members, json={"user_id": ann, "role": "owner"}, headers=ADMIN)
    assert added.status_code == 201 and added.json()["role"] == "owner"
    await client.post(members, json={"user_id": ben}, headers=ADMIN)
    twice = await client.post(members, json={"user_id": ben}, headers=ADMIN)
    assert twice.status_code == 409
    bad_role = await client.post(members, json={"user_id": ben, "role": "king"}, headers=ADMIN)
    assert bad_role.status_code == 400 and bad_role.json()["error"]["param"] == "role"
    demote = await client.patch(f"{members}/{ann}", json={"role": "member"}, headers=ADMIN)
    assert demote.status_code == 409
    assert (await client.delete(f"{members}/{ann}", headers=ADMIN)).status_code == 409
    promoted = await client.patch(f"{members}/{ben}", json={"role": "owner"}, headers=ADMIN)
    assert promoted.json()["role"] == "owner"
    assert (await client.delete(f"{members}/{ann}", headers=ADMIN)).status_code == 204
    listed = (await client.get(members, headers=ADMIN)).json()["data"]
    assert [(m["user_id"], m["role"]) for m in listed] == [(ben, "owner")]
    unknown = await client.post(members, json={"user_id": "user-nope"}, headers=ADMIN)
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "user_id"


async def test_a_team_with_keys_is_suspended_not_deleted(client: httpx.AsyncClient) -> None:
    empty = (await client.post("/admin/teams", json={"name": "Empty"}, headers=ADMIN)).json()
    assert (await client.delete(f"/admin/teams/{empty['id']}", headers=ADMIN)).status_code == 204
    assert (await client.get(f"/admin/teams/{empty['id']}", headers=ADMIN)).status_code == 404
    owning = (await client.post("/admin/teams", json={"name": "Owning"}, headers=ADMIN)).json()
    await new_key(client, team_id=owning["id"])
    refused = await client.delete(f"/admin/teams/{owning['id']}", headers=ADMIN)
    assert refused.status_code == 409 and "suspend" in refused.json()["error"]["message"]


async def test_team_input_is_validated(client: httpx.AsyncClient) -> None:
    blank = await client.post("/admin/teams", json={"name": ""}, headers=ADMIN)
    assert blank.status_code == 400 and blank.json()["error"]["param"] == "name"
    extra = await client.post("/admin/teams", json={"name": "x", "owner": "me"}, headers=ADMIN)
    assert extra.status_code == 400
    renamed = await client.post("/admin/teams", json={"name": "Old"}, headers=ADMIN)
    team_id = renamed.json()["id"]
    patched = await client.patch(f"/admin/teams/{team_id}", json={"name": "New"}, headers=ADMIN)
    assert patched.json()["name"] == "New"


async def test_a_team_carries_rate_limits_for_all_its_keys(client: httpx.AsyncClient) -> None:
    created = await client.post(
        "/admin/teams", json={"name": "Limited", "rate_limits": {"rpm": 10}}, headers=ADMIN
    )
    assert created.json()["rate_limits"] == {"rpm": 10}
    team_id = created.json()["id"]
    changed = await client.patch(
        f"/admin/teams/{team_id}",
        json={"rate_limits": {"tokens_per_day": 5000}},
        headers=ADMIN,
    )
    assert changed.json()["rate_limits"] == {"tokens_per_day": 5000}
    typo = await client.patch(
        f"/admin/teams/{team_id}", json={"rate_limits": {"rpx": 1}}, headers=ADMIN
    )
    assert typo.status_code == 400 and typo.json()["error"]["param"].startswith("rate_limits")

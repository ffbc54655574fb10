"""Users and sessions: bootstrap, sign-in, `me`, sign-out, and admin rights by session token."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from app.access.entities import User
from app.storage.memory import MemoryStorage
from app.storage.protocol import Storage, Where
from tests.access.conftest import ADMIN, ADMIN_PASSWORD, app_on, new_key, serve, sign_in

SECRET_KEY = "access-tests-secret-key-0123456789abcdef"


async def test_sign_in_me_and_sign_out(client: httpx.AsyncClient) -> None:
    session = await sign_in(client)
    me = await client.get("/auth/me", headers=session)
    assert me.status_code == 200
    assert me.json()["username"] == "admin" and me.json()["is_admin"] is True
    assert "password" not in me.text
    assert (await client.post("/auth/logout", headers=session)).status_code == 204
    after = await client.get("/auth/me", headers=session)
    assert after.status_code == 401 and "revoked" in after.json()["error"]["message"]
    assert (await client.get("/admin/users", headers=session)).status_code == 401


async def test_wrong_password_and_unknown_user_get_the_same_401(client: httpx.AsyncClient) -> None:
    wrong = await client.post("/auth/login", json={"username": "admin", "password": "nope-nope"})
    unknown = await client.post("/auth/login", json={"username": "ghost", "password": "nope-nope"})
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json()["error"]["message"] == unknown.json()["error"]["message"]
    missing = await client.post("/auth/login", json={"username": "admin"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "password"


async def test_admin_routes_take_an_admin_session_and_refuse_a_users(
    client: httpx.AsyncClient,
) -> None:
    admin_session = await sign_in(client)
    assert (await client.get("/admin/keys", headers=admin_session)).status_code == 200
    created = await client.post(
        "/admin/users", json={"username": "bob", "password": "bobs-password"}, headers=ADMIN
    )
    assert created.status_code == 201 and "password" not in created.text
    bob = await sign_in(client, "bob", "bobs-password")
    assert (await client.get("/auth/me", headers=bob)).json()["username"] == "bob"
    refused = await client.get("/admin/keys", headers=bob)
    assert refused.status_code == 403
    # A session token is not an API key.
    assert (await client.get("/v1/operations", headers=bob)).status_code == 401


async def test_a_suspended_users_session_stops_working(client: httpx.AsyncClient) -> None:
    created = await client.post(
        "/admin/users",
        json={"username": "carol", "password": "carols-password", "is_admin": True},
        headers=ADMIN,
    )
    carol = await sign_in(client, "carol", "carols-password")
    assert (await client.get("/admin/users", headers=carol)).status_code == 200
    user_id = created.json()["id"]
    await client.patch(f"/admin/users/{user_id}", json={"status": "suspended"}, headers=ADMIN)
    assert (await client.get("/admin/users", headers=carol)).status_code == 401
    again = await client.post(
        "/auth/login", json={"username": "carol", "password": "carols-password"}
    )
    assert again.status_code == 401


async def test_passwords_are_stored_as_argon2id(storage: Storage) -> None:
    async with serve(app_on(storage)):
        pass
    async with storage.unit_of_work() as uow:
        (admin,) = (await uow.repo(User).find(Where.eq("username", "admin"))).items
    assert (
        admin.password_hash.startswith("$argon2id$") and ADMIN_PASSWORD not in admin.password_hash
    )


async def test_first_start_prints_a_generated_password_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    storage = MemoryStorage()
    app = app_on(storage, ADMIN_DEFAULT_PASSWORD=None)
    async with serve(app):
        pass
    printed = capsys.readouterr().out
    assert "created the administrator 'admin' with password" in printed
    password = printed.split("with password ")[1].split()[0]
    async with serve(app_on(storage, ADMIN_DEFAULT_PASSWORD=None)) as client:
        assert "created the administrator" not in capsys.readouterr().out
        await sign_in(client, "admin", password)


async def test_the_last_admin_cannot_be_removed_suspended_or_demoted(
    client: httpx.AsyncClient,
) -> None:
    me = (await client.get("/auth/me", headers=await sign_in(client))).json()
    for change in ({"status": "suspended"}, {"is_admin": False}):
        refused = await client.patch(f"/admin/users/{me['id']}", json=change, headers=ADMIN)
        assert refused.status_code == 409
    assert (await client.delete(f"/admin/users/{me['id']}", headers=ADMIN)).status_code == 409
    await client.post(
        "/admin/users",
        json={"username": "second", "password": "second-admin", "is_admin": True},
        headers=ADMIN,
    )
    assert (await client.delete(f"/admin/users/{me['id']}", headers=ADMIN)).status_code == 204


async def test_sessions_survive_a_restart_with_the_same_secret_key(storage: Storage) -> None:
    async with serve(app_on(storage, SECRET_KEY=SECRET_KEY)) as first:
        session = await sign_in(first)
    async with serve(app_on(storage, SECRET_KEY=SECRET_KEY)) as second:
        assert (await second.get("/auth/me", headers=session)).status_code == 200
    async with serve(app_on(storage, SECRET_KEY="another-secret-key-entirely-000")) as third:
        assert (await third.get("/auth/me", headers=session)).status_code == 401


def rsa_pem() -> tuple[str, Any]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return pem, key


async def test_rs256_sessions_verify_with_the_key_or_the_configured_jwks() -> None:
    storage = MemoryStorage()
    old_pem, old_key = rsa_pem()
    async with serve(app_on(storage, JWT_ALGORITHM="RS256", JWT_PRIVATE_KEY=old_pem)) as first:
        session = await sign_in(first)
        token = session["Authorization"].split()[1]
        assert jwt.get_unverified_header(token)["alg"] == "RS256"
        assert (await first.get("/auth/me", headers=session)).status_code == 200
    # The signing key rotates; the old public key stays trusted through JWT_JWKS.
    kid = jwt.get_unverified_header(token)["kid"]
    old_jwk = {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(old_key.public_key())), "kid": kid}
    new_pem, _ = rsa_pem()
    rotated = {"JWT_ALGORITHM": "RS256", "JWT_PRIVATE_KEY": new_pem}
    async with serve(app_on(storage, **rotated)) as without_jwks:
        assert (await without_jwks.get("/auth/me", headers=session)).status_code == 401
    jwks = json.dumps({"keys": [old_jwk]})
    async with serve(app_on(storage, **rotated, JWT_JWKS=jwks)) as with_jwks:
        assert (await with_jwks.get("/auth/me", headers=session)).status_code == 200


async def test_a_forged_or_api_key_credential_is_not_a_session(client: httpx.AsyncClient) -> None:
    forged = jwt.encode(
        {"sub": "x", "exp": 9999999999},
        "a guessed signing key of decent length!!",
        algorithm="HS256",
    )
    response = await client.get("/auth/me", headers={"Authorization": f"Bearer {forged}"})
    assert response.status_code == 401
    none_alg = jwt.encode({"sub": "x"}, None, algorithm="none")  # type: ignore[arg-type]
    assert (
        await client.get("/admin/keys", headers={"Authorization": f"Bearer {none_alg}"})
    ).status_code == 401
    _, key = await new_key(client)
    assert (await client.get("/auth/me", headers=key)).status_code == 401

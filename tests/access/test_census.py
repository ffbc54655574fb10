"""The route census: every route of the app, including ones added later, demands credentials,
and every /admin route demands admin rights."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import iter_route_contexts

from app.storage.memory import MemoryStorage
from tests.access.conftest import ADMIN, app_on, new_key, serve, sign_in

# Routes that answer without credentials, on purpose. Nothing else may.
PUBLIC = frozenset(
    {
        ("GET", "/health"),
        ("GET", "/live"),
        ("GET", "/ready"),
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
        ("POST", "/auth/login"),
    }
)
_PARAM = re.compile(r"{([^}:]+)(:[^}]+)?}")


def every_route(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path) of every route the app serves, with placeholders in path parameters."""
    found = []
    # Routers included in routers are flattened, so a route is seen wherever it was declared.
    for route in iter_route_contexts(app.routes):
        methods = getattr(route, "methods", None) or set()
        path = getattr(route, "path", None)
        if path is None:
            continue
        for method in sorted(methods - {"HEAD", "OPTIONS"}):
            found.append((method, path))
    return found


def concrete(path: str) -> str:
    return _PARAM.sub("1", path)


async def unguarded(
    client: httpx.AsyncClient, routes: list[tuple[str, str]], headers: dict[str, str], want: int
) -> list[str]:
    """The routes that do not answer `want` with these headers."""
    wrong = []
    for method, path in routes:
        response = await client.request(method, concrete(path), headers=headers)
        if response.status_code != want:
            wrong.append(f"{method} {path} -> {response.status_code}")
    return wrong


@pytest.fixture
async def app_and_client() -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    app = app_on(MemoryStorage())
    async with serve(app) as client:
        yield app, client


async def test_every_route_but_the_public_ones_answers_401_without_credentials(
    app_and_client: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    app, client = app_and_client
    routes = [r for r in every_route(app) if r not in PUBLIC]
    assert len(routes) > 30  # the census sees the whole app, not a slice of it
    assert await unguarded(client, routes, {}, 401) == []
    bogus = {"Authorization": "Bearer gw-not-a-real-key-0000000000000000"}
    assert await unguarded(client, routes, bogus, 401) == []


async def test_every_admin_route_answers_403_to_a_non_admin_key_or_user(
    app_and_client: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    app, client = app_and_client
    admin_routes = [r for r in every_route(app) if r[1].startswith("/admin")]
    assert len(admin_routes) > 20
    _, plain_key = await new_key(client)
    assert await unguarded(client, admin_routes, plain_key, 403) == []
    await client.post(
        "/admin/users", json={"username": "plain", "password": "plain-password"}, headers=ADMIN
    )
    plain_user = await sign_in(client, "plain", "plain-password")
    assert await unguarded(client, admin_routes, plain_user, 403) == []


async def test_the_public_routes_exist_and_answer_without_credentials(
    app_and_client: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    app, client = app_and_client
    served = set(every_route(app))
    for method, path in sorted(PUBLIC):
        assert (method, path) in served, path
        if path != "/auth/login":
            assert (await client.request(method, path)).status_code == 200, path


async def test_the_census_catches_a_route_added_without_a_guard() -> None:
    app = app_on(MemoryStorage())

    @app.get("/admin/forgotten")
    async def forgotten() -> dict[str, str]:
        return {}

    async with serve(app) as client:
        routes = [r for r in every_route(app) if r not in PUBLIC]
        assert await unguarded(client, routes, {}, 401) == ["GET /admin/forgotten -> 200"]

"""Apps and clients for the access tests: a fresh app per test on the storage under test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.config import Settings
from app.main import create_app
from app.services import Services
from app.storage.protocol import Storage
from tests.fakes import RecordingQueue

ADMIN_KEY = "gw-access-tests-admin-secret-0123456789"
ADMIN_PASSWORD = "correct horse battery staple"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}

Running = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


@pytest.fixture(autouse=True)
def _no_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "BROKER": "stub",
        "ADMIN_API_KEY": ADMIN_KEY,
        "ADMIN_DEFAULT_PASSWORD": ADMIN_PASSWORD,
    }
    values.update(overrides)
    return Settings(**values)


@asynccontextmanager
async def serve(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """A client of `app` with its lifespan running (start-up bootstrap included)."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield client


def app_on(storage: Storage, **overrides: Any) -> FastAPI:
    return create_app(settings(**overrides), storage=storage, queue=RecordingQueue(storage))


@pytest.fixture
async def client(storage: Storage) -> AsyncIterator[httpx.AsyncClient]:
    """An app on the storage under test (memory, then PostgreSQL)."""
    async with serve(app_on(storage)) as client:
        yield client


def services_of(client: httpx.AsyncClient) -> Services:
    transport = client._transport
    assert isinstance(transport, httpx.ASGITransport)
    app: Any = transport.app
    services: Services = app.state.services
    return services


async def new_key(client: httpx.AsyncClient, **body: Any) -> tuple[str, dict[str, str]]:
    """A key made through the admin API: its id and the headers that present it."""
    response = await client.post("/admin/keys", json={"name": "client", **body}, headers=ADMIN)
    assert response.status_code == 201, response.text
    created = response.json()
    return created["id"], {"Authorization": f"Bearer {created['key']}"}


async def sign_in(
    client: httpx.AsyncClient, username: str = "admin", password: str = ADMIN_PASSWORD
) -> dict[str, str]:
    response = await client.post("/auth/login", json={"username": username, "password": password})
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}

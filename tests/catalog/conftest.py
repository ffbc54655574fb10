"""Fixtures for the catalogue: an app on the parametrised storage, an admin client, an upstream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import pytest
from fastapi import FastAPI

from app.config import Settings
from app.main import create_app
from app.services import Services
from app.storage.protocol import Storage
from tests.fakes import RecordingQueue

ADMIN = "gw-admin-secret-for-catalog-tests-0123456789"


@pytest.fixture
def settings() -> Settings:
    # Loopback is allowed so the credential test can reach the upstream the tests start.
    return Settings(
        BROKER="stub",
        ADMIN_API_KEY=ADMIN,
        SECRET_KEY="catalog-tests-key",
        OUTBOUND_ALLOWED_HOSTS="127.0.0.1",
    )


@pytest.fixture
async def app(settings: Settings, storage: Storage) -> AsyncIterator[FastAPI]:
    application = create_app(settings, storage=storage, queue=RecordingQueue(storage))
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
def services(app: FastAPI) -> Services:
    found: Services = app.state.services
    return found


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client holding the admin key."""
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app),
        base_url="http://gateway",
        headers={"Authorization": f"Bearer {ADMIN}"},
    ) as http:
        yield http


async def user_headers(services: Services) -> dict[str, str]:
    """Headers with a fresh key that has no admin rights."""
    _, secret = await services.keys.create_key(name="client", admin=False)
    return {"Authorization": f"Bearer {secret}"}


@dataclass
class Upstream:
    """A one-route HTTP server on loopback answering every request with `status` and `body`."""

    status: int = 200
    body: str = '{"object": "list", "data": []}'
    delay: float = 0.0
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        line, *header_lines = head.strip().split("\r\n")
        headers = {}
        for header in header_lines:
            name, _, value = header.partition(":")
            headers[name.strip().lower()] = value.strip()
        self.requests.append((line, headers))
        if self.delay:
            await asyncio.sleep(self.delay)
        payload = self.body.encode()
        writer.write(
            f"HTTP/1.1 {self.status} X\r\ncontent-type: application/json\r\n"
            f"content-length: {len(payload)}\r\nconnection: close\r\n\r\n".encode()
            + payload
        )
        await writer.drain()
        writer.close()


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    server_state = Upstream()
    server = await asyncio.start_server(server_state.handle, "127.0.0.1", 0)
    server_state.port = server.sockets[0].getsockname()[1]
    async with server:
        yield server_state

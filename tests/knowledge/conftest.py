"""Fixtures for knowledge bases: the app on the parametrised storage, an admin client, and a
helper that runs the jobs sent so far as a worker would."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.access.permissions import KeyPermissions
from app.config import Settings
from app.main import create_app
from app.operations.runner import JobTimings, OperationRunner
from app.services import Services, build_handlers
from app.storage.protocol import Storage
from tests.fakes import RecordingQueue

ADMIN = "gw-admin-secret-for-knowledge-tests-0123"
FAST = JobTimings(lease=5, heartbeat=1, retry_base=0.01, retry_max=0.02, resend_after=0.2)


@dataclass
class Gateway:
    app: FastAPI
    storage: Storage
    queue: RecordingQueue
    admin: httpx.AsyncClient

    @property
    def services(self) -> Services:
        services: Services = self.app.state.services
        return services

    def runner(self) -> OperationRunner:
        return OperationRunner(
            self.storage, self.queue, build_handlers(self.services), timings=FAST
        )

    async def run_jobs(self) -> int:
        """Execute the jobs sent so far, as a worker would."""
        runner = self.runner()
        ran = 0
        while self.queue.sent:
            await runner.execute(self.queue.sent.pop(0).operation_id)
            ran += 1
        return ran

    async def client(self, **permissions: Any) -> httpx.AsyncClient:
        """A client holding a new key without admin rights, with these permissions."""
        _, secret = await self.services.keys.create_key(
            name="reader", permissions=KeyPermissions(**permissions)
        )
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(self.app),
            base_url="http://gateway",
            headers={"Authorization": f"Bearer {secret}"},
        )

    async def base(self, base_id: str = "docs", **fields: Any) -> dict[str, Any]:
        body = {"id": base_id, "name": "Docs", "embedding_model": "mock-embedding", **fields}
        answer = await self.admin.post("/admin/knowledge-bases", json=body)
        assert answer.status_code == 201, answer.text
        created: dict[str, Any] = answer.json()
        return created

    async def document(self, base_id: str = "docs", **fields: Any) -> dict[str, Any]:
        answer = await self.admin.post(f"/admin/knowledge-bases/{base_id}/documents", json=fields)
        assert answer.status_code == 202, answer.text
        accepted: dict[str, Any] = answer.json()
        return accepted


def knowledge_settings(**overrides: Any) -> Settings:
    given: dict[str, Any] = {
        "BROKER": "stub",
        "ADMIN_API_KEY": ADMIN,
        "SECRET_KEY": "knowledge-tests",
        **overrides,
    }
    return Settings(**given)


@pytest.fixture
def settings() -> Settings:
    return knowledge_settings()


@pytest.fixture
async def gateway(settings: Settings, storage: Storage) -> AsyncIterator[Gateway]:
    queue = RecordingQueue(storage)
    app = create_app(settings, storage=storage, queue=queue)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app),
            base_url="http://gateway",
            headers={"Authorization": f"Bearer {ADMIN}"},
        ) as admin,
    ):
        yield Gateway(app, storage, queue, admin)

"""Fixtures of the workflow tests: the app on the storage under test, its admin API, a loopback
LLM upstream that counts calls, and a worker for the jobs the app sends."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.config import Settings
from app.credentials.entities import Provider
from app.main import create_app
from app.operations.runner import JobTimings, OperationRunner
from app.services import Services, build_handlers
from app.storage.protocol import Storage
from tests.fakes import RecordingQueue
from tests.gateway.conftest import add_models
from tests.gateway.upstream import FakeUpstream, UpstreamThread

ADMIN_KEY = "gw-workflow-tests-admin-secret-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
FAST = JobTimings(lease=5, heartbeat=1, retry_base=0.01, retry_max=0.02, resend_after=0.2)
# A chat model at the loopback upstream (calls counted there, as `up-llm`).
LLM = "llm"


@pytest.fixture(autouse=True)
def _no_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def upstream_server() -> Iterator[FakeUpstream]:
    thread = UpstreamThread()
    yield thread.start()
    thread.stop()


@pytest.fixture
def upstream(upstream_server: FakeUpstream) -> Iterator[FakeUpstream]:
    upstream_server.reset()
    yield upstream_server
    upstream_server.reset()


@dataclass
class Gateway:
    """The app, its storage and queue, and an HTTP client."""

    app: FastAPI
    storage: Storage
    queue: RecordingQueue
    http: httpx.AsyncClient

    @property
    def services(self) -> Services:
        services: Services = self.app.state.services
        return services

    async def admin(self, path: str, body: dict[str, Any], status: int = 201) -> dict[str, Any]:
        response = await self.http.post(path, json=body, headers=ADMIN)
        assert response.status_code == status, response.text
        answer: dict[str, Any] = response.json()
        return answer

    async def workflow(self, steps: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        body = {"id": extra.pop("id", "flow"), "name": "a flow", "steps": steps, **extra}
        return await self.admin("/admin/workflows", body)

    async def key(self, **body: Any) -> dict[str, str]:
        """The headers of a new key of a new team."""
        team = await self.admin("/admin/teams", {"name": "callers"})
        key = await self.admin("/admin/keys", {"name": "client", "team_id": team["id"], **body})
        return {"Authorization": f"Bearer {key['key']}"}

    async def execute(
        self,
        workflow_id: str = "flow",
        run_input: Any = None,
        *,
        query: str = "",
        headers: dict[str, str] | None = None,
        status: int = 200,
    ) -> dict[str, Any]:
        response = await self.http.post(
            f"/v1/workflows/{workflow_id}/execute{query}",
            json={"input": run_input},
            headers=headers or ADMIN,
        )
        assert response.status_code == status, response.text
        answer: dict[str, Any] = response.json()
        return answer

    def runner(self) -> OperationRunner:
        return OperationRunner(
            self.storage, self.queue, build_handlers(self.services), timings=FAST
        )

    async def run_jobs(self) -> int:
        """Execute the jobs sent so far (and those they send), as a worker would."""
        runner = self.runner()
        ran = 0
        while self.queue.sent:
            await runner.execute(self.queue.sent.pop(0).operation_id)
            ran += 1
        return ran

    async def operation(self, operation_id: str) -> dict[str, Any]:
        response = await self.http.get(f"/v1/operations/{operation_id}", headers=ADMIN)
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        return answer

    async def steps(self, operation_id: str) -> list[dict[str, Any]]:
        response = await self.http.get(f"/v1/workflows/runs/{operation_id}/steps", headers=ADMIN)
        assert response.status_code == 200, response.text
        data: list[dict[str, Any]] = response.json()["data"]
        return data


@pytest.fixture
def overrides(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Settings a test changes (by parametrizing this fixture indirectly)."""
    changed: dict[str, Any] = getattr(request, "param", {})
    return changed


@pytest.fixture
async def gateway(
    storage: Storage, upstream: FakeUpstream, overrides: dict[str, Any]
) -> AsyncIterator[Gateway]:
    queue = RecordingQueue(storage)
    values: dict[str, Any] = {
        "BROKER": "stub",
        "ADMIN_API_KEY": ADMIN_KEY,
        "ADMIN_DEFAULT_PASSWORD": "admin-password-for-tests",
        "METERING_CACHE_SECONDS": 0,
        "UPSTREAM_MAX_RETRIES": 0,
        # The loopback upstream and test servers; a test may take the allowance away.
        "OUTBOUND_ALLOWED_HOSTS": "127.0.0.1",
        **overrides,
    }
    settings = Settings(**values)
    app = create_app(settings, storage=storage, queue=queue)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
            gateway_ = Gateway(app, storage, queue, http)
            await add_models(gateway_.services, upstream, (LLM, Provider.OPENAI, {}))
            yield gateway_


def chat_step(name: str, text: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": "chat_completion", "model_id": LLM, "user_message": text, **extra}

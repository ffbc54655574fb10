"""Fixtures of the experiment tests: an app on the parametrised storage with priced mock
models, keys to call it with, and a worker for the jobs it sends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.config import Settings
from app.experiments.entities import ExperimentRecord
from app.main import create_app
from app.operations.runner import JobTimings, OperationRunner
from app.services import Services, build_handlers
from app.storage.protocol import Storage, Where
from tests.fakes import RecordingQueue

ADMIN_KEY = "gw-experiment-tests-admin-secret-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
FAST = JobTimings(lease=5, heartbeat=1, retry_base=0.01, retry_max=0.02, resend_after=0.2)


def mock_model(model_id: str, **parameters: Any) -> dict[str, Any]:
    """A mock model reporting 5 prompt and 7 completion tokens; at $2 and $10 per million
    tokens a call costs 5 * 2 + 7 * 10 = 80 micro-dollars."""
    return {
        "id": model_id,
        "provider": "mock",
        "provider_model": "mock",
        "parameters": {"mock_prompt_tokens": 5, "mock_completion_tokens": 7, **parameters},
        "input_price_per_million": "2",
        "output_price_per_million": "10",
    }


def variant(variant_id: str, allocation: float, **changes: Any) -> dict[str, Any]:
    return {"id": variant_id, "allocation": allocation, **changes}


def experiment(experiment_id: str = "exp", **overrides: Any) -> dict[str, Any]:
    """An experiment on model `base`: control as asked, `other` on model `other`."""
    body: dict[str, Any] = {
        "id": experiment_id,
        "name": "Other model",
        "target_kind": "model",
        "target": "base",
        "variants": [
            variant("control", 50, control=True),
            variant("other", 50, model="other", params={"temperature": 0.2}),
        ],
    }
    body.update(overrides)
    return body


def chat(model: str = "base", text: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


@dataclass
class Gateway:
    """The app on the storage under test, its admin API, and a worker for its jobs."""

    app: FastAPI
    storage: Storage
    queue: RecordingQueue
    http: httpx.AsyncClient

    @property
    def services(self) -> Services:
        services: Services = self.app.state.services
        return services

    async def post(self, path: str, body: Any = None, status: int = 200, **kw: Any) -> Any:
        kw.setdefault("headers", ADMIN)
        response = await self.http.post(path, json=body, **kw)
        assert response.status_code == status, response.text
        return response.json()

    async def get(self, path: str, status: int = 200, **kw: Any) -> Any:
        kw.setdefault("headers", ADMIN)
        response = await self.http.get(path, **kw)
        assert response.status_code == status, response.text
        return response.json()

    async def patch(self, path: str, body: Any, status: int = 200) -> Any:
        response = await self.http.patch(path, json=body, headers=ADMIN)
        assert response.status_code == status, response.text
        return response.json()

    async def delete(self, path: str, status: int = 200) -> Any:
        response = await self.http.delete(path, headers=ADMIN)
        assert response.status_code == status, response.text
        return response.json()

    async def running(self, body: dict[str, Any]) -> dict[str, Any]:
        """Create and start an experiment."""
        await self.post("/admin/experiments", body, 201)
        started: dict[str, Any] = await self.post(f"/admin/experiments/{body['id']}/start")
        return started

    async def client_key(self, name: str = "client") -> tuple[dict[str, str], str]:
        """A key without admin rights: the headers presenting it, and its id."""
        key = await self.post("/admin/keys", {"name": name}, 201)
        return {"Authorization": f"Bearer {key['key']}"}, key["id"]

    async def records(self, *where: Where) -> list[ExperimentRecord]:
        """The records stored, once those of live calls still buffered are written."""
        await self.services.live_experiments.records.flush()
        async with self.storage.unit_of_work() as uow:
            page = await uow.repo(ExperimentRecord).find(*where, order_by=["created_at"])
        return page.items

    async def run_jobs(self) -> int:
        """Execute the jobs sent so far, as a worker would."""
        runner = OperationRunner(
            self.storage, self.queue, build_handlers(self.services), timings=FAST
        )
        ran = 0
        while self.queue.sent:
            await runner.execute(self.queue.sent.pop(0).operation_id)
            ran += 1
        return ran


@pytest.fixture
async def gateway(storage: Storage) -> AsyncIterator[Gateway]:
    queue = RecordingQueue(storage)
    settings = Settings(
        BROKER="stub",
        ADMIN_API_KEY=ADMIN_KEY,
        ADMIN_DEFAULT_PASSWORD="admin-password-for-tests",
        METERING_CACHE_SECONDS=0,
    )
    app = create_app(settings, storage=storage, queue=queue)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
            gateway_ = Gateway(app, storage, queue, http)
            for model_id in ("base", "other"):
                await gateway_.post("/admin/models", mock_model(model_id), 201)
            await gateway_.post(
                "/admin/models",
                mock_model("broken", mock_failure_rate=1, mock_failure="permanent"),
                201,
            )
            yield gateway_

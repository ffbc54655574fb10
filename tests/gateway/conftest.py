"""Fixtures of the gateway tests: a loopback upstream, an app wired to it, and API keys."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI

from app.config import Settings
from app.credentials.entities import Provider, StoredCredential
from app.main import create_app
from app.models.entities import Model, ModelKind
from app.services import Services
from app.storage.memory import MemoryStorage
from app.storage.protocol import Storage
from tests.fakes import RecordingQueue
from tests.gateway.upstream import FakeUpstream, UpstreamThread

ADMIN = "gw-admin-secret-for-gateway-tests-0123456789"
UPSTREAM_SECRET = "sk-upstream-secret-never-shown-4242"


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


def gateway_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "BROKER": "stub",
        "ADMIN_API_KEY": ADMIN,
        "ADMIN_DEFAULT_PASSWORD": "admin-password-for-tests",
        "BREAKER_FAILURE_THRESHOLD": 3,
        "BREAKER_COOLDOWN_SECONDS": 0.3,
        "UPSTREAM_TIMEOUT_SECONDS": 1.0,
        "UPSTREAM_MAX_RETRIES": 0,
        # The fake upstream listens on loopback, which provider calls refuse unless listed.
        "OUTBOUND_ALLOWED_HOSTS": "127.0.0.1",
        **overrides,
    }
    return Settings(**values)


@pytest.fixture
def settings() -> Settings:
    return gateway_settings()


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    storage = MemoryStorage()
    application = create_app(settings, storage=storage, queue=RecordingQueue(storage))
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
def services(app: FastAPI) -> Services:
    services: Services = app.state.services
    return services


@pytest.fixture
async def sdk(app: FastAPI) -> AsyncIterator[openai.AsyncOpenAI]:
    """The official SDK, holding the admin key, talking to `app`."""
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app))
    client = openai.AsyncOpenAI(
        api_key=ADMIN, base_url="http://gateway/v1", http_client=http, max_retries=0
    )
    yield client
    await http.aclose()


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://gateway", headers={"Authorization": f"Bearer {ADMIN}"}
    ) as http:
        yield http


async def add_models(
    services: Services,
    upstream: FakeUpstream,
    *models: tuple[str, Provider, dict[str, Any]],
    kind: ModelKind = ModelKind.CHAT,
) -> None:
    """Store models at the loopback upstream in a running app."""
    await store_models(services.storage, upstream, *models, kind=kind)
    services.chat.invalidate()


async def store_models(
    storage: Storage,
    upstream: FakeUpstream,
    *models: tuple[str, Provider, dict[str, Any]],
    kind: ModelKind = ModelKind.CHAT,
) -> None:
    """Store a credential per provider (secret in an env var) and the models pointing at it."""
    os.environ["GATEWAY_TEST_UPSTREAM_KEY"] = UPSTREAM_SECRET
    async with storage.unit_of_work() as uow:
        for provider in {p for _, p, _ in models}:
            if await uow.repo(StoredCredential).get(f"cred-{provider}") is None:
                await uow.repo(StoredCredential).add(
                    StoredCredential(
                        id=f"cred-{provider}",
                        name=str(provider),
                        provider=provider,
                        env_var="GATEWAY_TEST_UPSTREAM_KEY",
                        endpoint=upstream.url
                        if provider is Provider.AZURE_OPENAI
                        else upstream.url + ("/v1" if provider is Provider.OPENAI else ""),
                        api_version="2024-06-01" if provider is Provider.AZURE_OPENAI else None,
                    )
                )
        for model_id, provider, parameters in models:
            await uow.repo(Model).add(
                Model(
                    id=model_id,
                    name=model_id,
                    kind=kind,
                    provider=provider,
                    provider_model=f"up-{model_id}",
                    credential_id=f"cred-{provider}",
                    parameters=parameters,
                )
            )
        await uow.commit()


def chat(model: str, text: str = "hello world", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}

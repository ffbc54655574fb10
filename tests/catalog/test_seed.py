"""Seed data: a fresh install answers out of the box, and seeding twice changes nothing."""

from __future__ import annotations

import httpx
import pytest
from pydantic import SecretStr

from app.cli import main
from app.config import Settings, StorageBackend
from app.seed import seed, seed_database, seed_services
from app.services import Services
from tests.catalog.conftest import user_headers
from tests.conftest import truncate_all


async def test_seeding_twice_creates_everything_once_and_keeps_changes(
    client: httpx.AsyncClient, services: Services
) -> None:
    first = await seed(services.credentials, services.models, services.prompts, services.chains)
    assert "model mock-fast" in first.created and "prompt greeting" in first.created
    assert "chain mock-resilient" in first.created
    await client.patch("/admin/models/mock-slow", json={"parameters": {"mock_latency_ms": 10}})
    second = await seed(services.credentials, services.models, services.prompts, services.chains)
    assert second.created == []
    slow = (await client.get("/admin/models/mock-slow")).json()
    assert slow["parameters"] == {"mock_latency_ms": 10}
    listed = (await client.get("/v1/models")).json()
    assert {"mock", "mock-fast", "mock-slow", "mock-flaky"} <= {m["id"] for m in listed["data"]}
    flaky = (await client.get("/admin/models/mock-flaky")).json()
    assert flaky["parameters"]["mock_failure_rate"] == 0.5
    assert flaky["credential_id"] == "mock"


async def test_seeded_prompts_render_with_their_production_label(
    services: Services,
) -> None:
    await seed(services.credentials, services.models, services.prompts)
    greeting = await services.prompts.render("greeting", {"user_name": "Ann"})
    assert "Ann" in greeting.text and greeting.version == 1
    translated = await services.prompts.render("translate", {"text": "hola"})
    assert "English" in translated.text
    summary = await services.prompts.render("summarize", {"text": "t", "max-words": 9})
    assert "at most 9 words" in summary.text


async def test_seed_database_seeds_postgres_once(database_url: str) -> None:
    truncate_all(database_url)
    settings = Settings(
        STORAGE_BACKEND=StorageBackend.POSTGRES,
        DATABASE_URL=database_url,
        SECRET_KEY=SecretStr("seed-tests-key"),
    )
    first = await seed_database(settings)
    assert "credential mock" in first.created and "model mock-flaky" in first.created
    assert "chain mock-resilient" in first.created
    assert (await seed_database(settings)).created == []


def test_gateway_seed_refuses_memory_storage(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("STORAGE_BACKEND", "memory")
    assert main(["seed"]) == 2
    assert "STORAGE_BACKEND=memory" in capsys.readouterr().err


async def test_the_seeded_chain_always_answers_through_its_fallback(
    client: httpx.AsyncClient, services: Services
) -> None:
    await seed_services(services)
    headers = await user_headers(services)
    chat = {"model": "mock-resilient", "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(6):
        answer = await client.post("/v1/chat/completions", json=chat, headers=headers)
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] in ("mock-flaky", "mock-fast")

"""Rate limits, budgets and usage on the chat path, over HTTP, in one and in two API processes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from app.config import Settings
from app.credentials.entities import Provider
from app.main import create_app
from app.models.entities import Model
from app.storage.protocol import Storage
from app.usage.entities import UsageRecord
from tests.fakes import RecordingQueue
from tests.usage.test_api import ADMIN, ADMIN_KEY, app_on, serve, services_of

# Ten output tokens at $10 per million: every call costs exactly 100 micro-dollars.
PRICED = Model(
    id="priced-mock",
    name="Priced mock",
    provider=Provider.MOCK,
    provider_model="mock",
    parameters={"mock_completion_tokens": 10},
    output_price_per_million=Decimal("10"),
)
CALL = {"model": "priced-mock", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(autouse=True)
def _no_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


async def add_priced_model(storage: Storage) -> None:
    async with storage.unit_of_work() as uow:
        await uow.repo(Model).add(PRICED.model_copy())
        await uow.commit()


@pytest.fixture
async def client(storage: Storage) -> AsyncIterator[httpx.AsyncClient]:
    await add_priced_model(storage)
    async with serve(app_on(storage, METERING_CACHE_SECONDS=0)) as client:
        yield client


async def new_key(client: httpx.AsyncClient, **body: Any) -> dict[str, str]:
    response = await client.post("/admin/keys", json={"name": "client", **body}, headers=ADMIN)
    assert response.status_code == 201, response.text
    return {"Authorization": f"Bearer {response.json()['key']}"}


async def records(storage: Storage) -> list[UsageRecord]:
    async with storage.unit_of_work() as uow:
        return (await uow.repo(UsageRecord).find()).items


async def test_a_chat_call_is_recorded_and_answers_with_rate_limit_headers(
    client: httpx.AsyncClient, storage: Storage
) -> None:
    key = await new_key(client, rate_limits={"requests_per_minute": 5, "tokens_per_minute": 1000})
    response = await client.post("/v1/chat/completions", json=CALL, headers=key)
    assert response.status_code == 200, response.text
    assert response.headers["x-ratelimit-limit-requests"] == "5"
    assert response.headers["x-ratelimit-remaining-requests"] == "4"
    assert response.headers["x-ratelimit-limit-tokens"] == "1000"
    (record,) = await records(storage)
    assert record.model_id == "priced-mock" and record.output_tokens == 10
    assert record.cost_micros == 100 and record.provider == "mock"


async def test_a_streamed_call_is_recorded_too(client: httpx.AsyncClient, storage: Storage) -> None:
    key = await new_key(client)
    body = {**CALL, "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/chat/completions", json=body, headers=key) as response:
        assert response.status_code == 200
        text = "".join([chunk async for chunk in response.aiter_text()])
    assert text.rstrip().endswith("data: [DONE]")
    (record,) = await records(storage)
    assert record.output_tokens == 10 and record.cost_micros == 100


async def test_the_request_past_the_limit_gets_429_with_retry_after(
    client: httpx.AsyncClient,
) -> None:
    key = await new_key(client, rate_limits={"requests_per_minute": 2})
    for _ in range(2):
        assert (
            await client.post("/v1/chat/completions", json=CALL, headers=key)
        ).status_code == 200
    refused = await client.post("/v1/chat/completions", json=CALL, headers=key)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"


async def test_200_concurrent_calls_against_a_budget_for_50(
    client: httpx.AsyncClient, storage: Storage
) -> None:
    created = await client.post(
        "/admin/budgets",
        json={"name": "all", "period": "daily", "hard_limit_micros": 50 * 100},
        headers=ADMIN,
    )
    assert created.status_code == 201
    key = await new_key(client)

    async def one() -> httpx.Response:
        return await client.post("/v1/chat/completions", json=CALL, headers=key)

    responses = await asyncio.gather(*(one() for _ in range(200)))
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == 50
    refused = [r for r in responses if r.status_code != 200]
    assert {r.status_code for r in refused} == {402}
    assert {r.json()["error"]["code"] for r in refused} == {"budget_exceeded"}
    spent = sum(r.cost_micros for r in await records(storage))
    assert spent <= 50 * 100 + 100
    budget = (await client.get(f"/admin/budgets/{created.json()['id']}", headers=ADMIN)).json()
    assert budget["current_usage_micros"] == spent and budget["status"] == "exceeded"


async def test_a_rate_limit_holds_across_two_api_processes_on_real_redis(
    storage: Storage, redis_url: str, redis: aioredis.Redis, database_url: str
) -> None:
    if storage.name != "postgres":
        pytest.skip("two API processes share PostgreSQL; memory storage lives in one process")
    await add_priced_model(storage)
    settings = Settings(
        STORAGE_BACKEND="postgres",
        PROCESS_ROLE="api",
        BROKER="redis",
        REDIS_URL=redis_url,
        DATABASE_URL=database_url,
        SECRET_KEY="usage-tests-secret-key-0123456789",
        ADMIN_API_KEY=ADMIN_KEY,
        METERING_CACHE_SECONDS=0,
    )
    first = create_app(settings, storage=storage, queue=RecordingQueue(storage))
    second = create_app(settings, storage=storage, queue=RecordingQueue(storage))
    async with serve(first) as one, serve(second) as two:
        key = await new_key(one, rate_limits={"requests_per_minute": 6})
        calls = [
            (one if n % 2 else two).post("/v1/chat/completions", json=CALL, headers=key)
            for n in range(16)
        ]
        statuses = [r.status_code for r in await asyncio.gather(*calls)]
    assert statuses.count(200) == 6 and statuses.count(429) == 10


async def test_a_small_token_limit_admits_calls_without_max_tokens_and_counts_their_usage(
    client: httpx.AsyncClient, storage: Storage
) -> None:
    async with storage.unit_of_work() as uow:
        await uow.repo(Model).add(
            PRICED.model_copy(update={"id": "windowed-mock", "context_window": 128_000})
        )
        await uow.commit()
    created = await client.post(
        "/admin/keys",
        json={"name": "small", "rate_limits": {"tokens_per_minute": 1000}},
        headers=ADMIN,
    )
    key = {"Authorization": f"Bearer {created.json()['key']}"}
    call = {"model": "windowed-mock", "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(3):
        response = await client.post("/v1/chat/completions", json=call, headers=key)
        assert response.status_code == 200, response.text
    services = services_of(client)
    await services.metering.flush_corrections()
    # One counter per minute: the calls may straddle two.
    counters = await services.redis.keys(f"gateway:rl:key:{created.json()['id']}:tokens:60:*")
    counted = sum([int(await services.redis.get(counter)) for counter in counters])
    usage = response.json()["usage"]
    assert counted == 3 * usage["total_tokens"]
    assert (
        sum(r.input_tokens + r.output_tokens for r in await records(storage))
        == 3 * usage["total_tokens"]
    )


async def test_an_input_larger_than_the_token_limit_is_a_429_naming_the_limit(
    client: httpx.AsyncClient,
) -> None:
    key = await new_key(client, rate_limits={"tokens_per_minute": 1000})
    call = {"model": "priced-mock", "messages": [{"role": "user", "content": "word " * 1000}]}
    refused = await client.post("/v1/chat/completions", json=call, headers=key)
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
    assert "tokens_per_minute" in error["message"] and "1000" in error["message"]

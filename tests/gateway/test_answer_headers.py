"""The headers every answer carries: who answered (model and provider, after fallbacks), what it
cost (exactly the usage record's figure), the gateway's own time, the cache, the request id;
direct and streamed, through the fast path and through the FastAPI stack. The usage record and
the execution log keep the same facts."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI

from app.credentials.entities import Provider
from app.gateway.calls import usd
from app.logs.entities import ExecutionLog
from app.models.entities import Model, ModelKind
from app.services import Services
from app.usage.entities import UsageRecord
from tests.gateway.conftest import add_models, chat, gateway_settings
from tests.gateway.test_routing import make_chain
from tests.gateway.upstream import FakeUpstream, Fault

# The fast path answers plain requests; any other query string sends one through the stack.
PATHS = {"fast": "/v1/chat/completions", "stack": "/v1/chat/completions?via=stack"}
UPSTREAM_DELAY = 0.3


@pytest.fixture
def settings() -> Any:
    """With the response cache on, whose status every answer reports."""
    return gateway_settings(CACHE_BACKEND="memory")


async def priced(services: Services, *model_ids: str, price: str = "2.5") -> None:
    """Give models an input and an output price per million tokens."""
    async with services.storage.unit_of_work() as uow:
        for model_id in model_ids:
            model = await uow.repo(Model).get(model_id)
            assert model is not None
            model.input_price_per_million = Decimal(price)
            model.output_price_per_million = Decimal(price) * 4
            await uow.repo(Model).update(model)
        await uow.commit()
    services.chat.invalidate()


async def records(services: Services) -> list[UsageRecord]:
    async with services.storage.unit_of_work() as uow:
        return list((await uow.repo(UsageRecord).find(order_by=["created_at"])).items)


async def execution_logs(services: Services) -> list[ExecutionLog]:
    async with services.storage.unit_of_work() as uow:
        return list((await uow.repo(ExecutionLog).find(order_by=["created_at"])).items)


def assert_same_facts(response: httpx.Response, record: UsageRecord, entry: ExecutionLog) -> None:
    """The usage record and the execution log say what the answer's headers said."""
    headers = response.headers
    overhead = float(headers["x-gateway-overhead-ms"])
    cached = headers.get("x-gateway-cache") == "hit"
    for kept in (record, entry):
        assert kept.provider == headers["x-gateway-provider"]
        assert kept.overhead_ms == overhead
        assert kept.cache_hit is cached
        assert kept.cost_micros == record.cost_micros
    if "x-gateway-response-cost" in headers:
        assert cost_of(response) == record.cost_micros


def cost_of(response: httpx.Response) -> int:
    """The cost header back in micro-dollars (it is a decimal string of dollars)."""
    return int(Decimal(response.headers["x-gateway-response-cost"]) * 1_000_000)


@pytest.mark.parametrize("via", PATHS)
async def test_a_direct_answer_says_its_model_provider_cost_and_overhead(
    client: httpx.AsyncClient, services: Services, upstream: FakeUpstream, via: str
) -> None:
    await add_models(services, upstream, ("gpt", Provider.OPENAI, {}))
    await priced(services, "gpt")
    upstream.delays["up-gpt"] = UPSTREAM_DELAY
    response = await client.post(
        PATHS[via], json=chat("gpt", "what does it cost"), headers={"x-request-id": "mine-1"}
    )
    assert response.status_code == 200, response.text
    headers = response.headers
    assert headers["x-request-id"] == "mine-1"
    assert (headers["x-gateway-model"], headers["x-gateway-provider"]) == ("gpt", "openai")
    (record,) = await records(services)
    assert record.cost_micros > 0
    assert headers["x-gateway-response-cost"] == usd(record.cost_micros)
    assert cost_of(response) == record.cost_micros
    assert record.provider == "openai" and record.model_id == "gpt"
    # The upstream's 300 ms are not the gateway's: what is left is the gateway's own work.
    overhead = float(headers["x-gateway-overhead-ms"])
    assert 0 < overhead < UPSTREAM_DELAY * 1000 / 3
    assert record.latency_ms >= UPSTREAM_DELAY * 1000
    assert headers["x-gateway-cache"] == "miss"
    (entry,) = await execution_logs(services)
    assert_same_facts(response, record, entry)


@pytest.mark.parametrize("via", PATHS)
async def test_after_a_fallback_the_second_model_and_its_provider_and_price_are_named(
    client: httpx.AsyncClient, services: Services, upstream: FakeUpstream, via: str
) -> None:
    await add_models(
        services, upstream, ("primary", Provider.OPENAI, {}), ("backup", Provider.ANTHROPIC, {})
    )
    await priced(services, "primary", price="1")
    await priced(services, "backup", price="7")
    await make_chain(client, "smart", {"model_id": "primary"}, {"model_id": "backup"})
    upstream.fail("up-primary", Fault(status=503))
    response = await client.post(PATHS[via], json=chat("smart"))
    assert response.status_code == 200, response.text
    assert response.headers["x-gateway-model"] == "backup"
    assert response.headers["x-gateway-provider"] == "anthropic"
    (record,) = await records(services)
    assert (record.model_id, record.provider) == ("backup", "anthropic")
    assert cost_of(response) == record.cost_micros > 0


@pytest.mark.parametrize("via", PATHS)
async def test_a_stream_says_who_answers_and_its_overhead_to_the_first_chunk_but_no_cost(
    client: httpx.AsyncClient, services: Services, upstream: FakeUpstream, via: str
) -> None:
    await add_models(services, upstream, ("a", Provider.OPENAI, {}), ("b", Provider.ANTHROPIC, {}))
    await priced(services, "a", "b")
    await make_chain(client, "ab", {"model_id": "a"}, {"model_id": "b"})
    upstream.fail("up-a", Fault(status=503))
    upstream.delays["up-b"] = UPSTREAM_DELAY
    response = await client.post(
        PATHS[via], json=chat("ab", stream=True), headers={"x-request-id": "mine-2"}
    )
    assert response.status_code == 200 and response.text.endswith("data: [DONE]\n\n")
    headers = response.headers
    assert (headers["x-gateway-model"], headers["x-gateway-provider"]) == ("b", "anthropic")
    assert headers["x-request-id"] == "mine-2"
    assert 0 < float(headers["x-gateway-overhead-ms"]) < UPSTREAM_DELAY * 1000 / 3
    # Not known when the headers leave: the usage record has it once the stream ends.
    assert "x-gateway-response-cost" not in headers
    (record,) = await records(services)
    assert (record.model_id, record.provider) == ("b", "anthropic") and record.cost_micros > 0
    (entry,) = await execution_logs(services)
    assert_same_facts(response, record, entry)


async def test_embeddings_say_their_model_provider_cost_and_overhead(
    client: httpx.AsyncClient, services: Services, upstream: FakeUpstream
) -> None:
    await add_models(services, upstream, ("emb", Provider.OPENAI, {}), kind=ModelKind.EMBEDDING)
    await priced(services, "emb", price="100000")
    upstream.delays["up-emb"] = UPSTREAM_DELAY
    response = await client.post("/v1/embeddings", json={"model": "emb", "input": ["a", "b"]})
    assert response.status_code == 200, response.text
    headers = response.headers
    assert (headers["x-gateway-model"], headers["x-gateway-provider"]) == ("emb", "openai")
    (record,) = await records(services)
    assert cost_of(response) == record.cost_micros > 0
    assert 0 < float(headers["x-gateway-overhead-ms"]) < UPSTREAM_DELAY * 1000 / 3
    (entry,) = await execution_logs(services)
    assert_same_facts(response, record, entry)


@pytest.mark.parametrize("via", PATHS)
async def test_a_cached_answer_says_so_and_costs_nothing(
    client: httpx.AsyncClient, services: Services, upstream: FakeUpstream, via: str
) -> None:
    await add_models(services, upstream, ("gpt", Provider.OPENAI, {}))
    await priced(services, "gpt")
    first = await client.post(PATHS[via], json=chat("gpt", "same question"))
    second = await client.post(PATHS[via], json=chat("gpt", "same question"))
    streamed = await client.post(PATHS[via], json=chat("gpt", "same question", stream=True))
    assert first.headers["x-gateway-cache"] == "miss"
    assert second.headers["x-gateway-cache"] == streamed.headers["x-gateway-cache"] == "hit"
    assert upstream.calls("up-gpt") == 1
    miss, hit, _ = await records(services)
    assert cost_of(first) == miss.cost_micros > 0
    assert second.headers["x-gateway-response-cost"] == "0.000000" and hit.cost_micros == 0
    for response in (second, streamed):
        assert response.headers["x-gateway-provider"] == "openai"
        assert response.headers["x-gateway-model"] == "gpt"
        assert float(response.headers["x-gateway-overhead-ms"]) > 0
    for response, record, entry in zip(
        (first, second, streamed),
        await records(services),
        await execution_logs(services),
        strict=True,
    ):
        assert_same_facts(response, record, entry)


async def test_the_openai_sdk_still_reads_answers_and_exposes_the_headers(
    sdk: openai.AsyncOpenAI, app: FastAPI
) -> None:
    raw = await sdk.chat.completions.with_raw_response.create(
        model="mock", messages=[{"role": "user", "content": "hi"}]
    )
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert raw.headers["x-gateway-provider"] == "mock"
    assert raw.headers["x-gateway-response-cost"] == "0.000000"  # the mock model is free


def test_usd_is_exact() -> None:
    assert usd(80) == "0.000080"
    assert usd(0) == "0.000000"
    assert usd(12_345_678) == "12.345678"
    assert usd(-5) == "-0.000005"

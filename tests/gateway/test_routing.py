"""Retries, fallback through chains, latency thresholds and circuit breakers."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson

from app.credentials.entities import Provider
from app.gateway.routing import CircuitBreakers
from app.services import Services
from tests.gateway.conftest import add_models, chat
from tests.gateway.upstream import FakeUpstream, Fault


async def make_chain(client: httpx.AsyncClient, chain_id: str, *steps: dict[str, Any]) -> None:
    response = await client.post(
        "/admin/chains", json={"id": chain_id, "name": chain_id, "steps": list(steps)}
    )
    assert response.status_code == 201, response.text


async def test_transient_errors_are_retried_with_backoff_and_permanent_ones_are_not(
    client: httpx.AsyncClient, services: Services, upstream: FakeUpstream
) -> None:
    await add_models(
        services, upstream, ("gpt", Provider.OPENAI, {"max_retries": 2, "backoff_ms": 1})
    )
    upstream.fail("up-gpt", Fault(status=503), Fault(status=429))
    response = await client.post("/v1/chat/completions", json=chat("gpt"))
    assert response.status_code == 200 and upstream.calls("up-gpt") == 3

    upstream.seen.clear()
    upstream.fail("up-gpt", Fault(status=400))
    refused = await client.post("/v1/chat/completions", json=chat("gpt"))
    assert refused.status_code == 400 and upstream.calls("up-gpt") == 1


async def test_a_chain_falls_back_to_the_next_model_and_says_which_answered(
    client: httpx.AsyncClient, services: Services, upstream: FakeUpstream
) -> None:
    await add_models(
        services, upstream, ("primary", Provider.OPENAI, {}), ("backup", Provider.ANTHROPIC, {})
    )
    await make_chain(
        client,
        "smart",
        {"model_id": "primary", "max_retries": 1, "backoff_ms": 1},
        {"model_id": "backup"},
    )
    upstream.fail("up-primary", Fault(status=500), Fault(status=502))
    response = await client.post("/v1/chat/completions", json=chat("smart"))
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "backup"
    assert response.headers["x-gateway-model"] == "backup"
    assert upstream.calls("up-primary") == 2 and upstream.calls("up-backup") == 1


async def test_a_request_error_stops_the_chain_instead_of_trying_every_model(
    client: httpx.AsyncClient, services: Services, upstream: FakeUpstream
) -> None:
    await add_models(services, upstream, ("a", Provider.OPENAI, {}), ("b", Provider.OPENAI, {}))
    await make_chain(client, "ab", {"model_id": "a"}, {"model_id": "b"})
    upstream.fail("up-a", Fault(status=400))
    response = await client.post("/v1/chat/completions", json=chat("ab"))
    assert response.status_code == 400 and upstream.calls("up-b") == 0


async def test_a_step_slower_than_its_threshold_moves_on_to_the_next(
    client: httpx.AsyncClient, services: Services, upstream: FakeUpstream
) -> None:
    await add_models(
        services, upstream, ("slow", Provider.OPENAI, {}), ("fast", Provider.OPENAI, {})
    )
    await make_chain(
        client, "quick", {"model_id": "slow", "latency_threshold_ms": 100}, {"model_id": "fast"}
    )
    upstream.fail("up-slow", Fault(delay=0.8))
    started = asyncio.get_running_loop().time()
    response = await client.post("/v1/chat/completions", json=chat("quick"))
    assert response.json()["model"] == "fast"
    assert asyncio.get_running_loop().time() - started < 0.6


async def test_streams_fall_back_before_the_first_chunk(
    client: httpx.AsyncClient, services: Services, upstream: FakeUpstream
) -> None:
    await add_models(services, upstream, ("a", Provider.OPENAI, {}), ("b", Provider.ANTHROPIC, {}))
    await make_chain(client, "ab", {"model_id": "a"}, {"model_id": "b"})
    upstream.fail("up-a", Fault(status=503))
    response = await client.post("/v1/chat/completions", json=chat("ab", stream=True))
    assert response.status_code == 200 and response.headers["x-gateway-model"] == "b"
    assert response.text.endswith("data: [DONE]\n\n")


async def test_an_upstream_error_mid_stream_ends_with_an_error_event(
    client: httpx.AsyncClient, services: Services, upstream: FakeUpstream
) -> None:
    await add_models(services, upstream, ("gpt", Provider.OPENAI, {}))
    upstream.fail("up-gpt", Fault(error_after_chunks=1))
    response = await client.post("/v1/chat/completions", json=chat("gpt", stream=True))
    assert response.status_code == 200
    last = response.text.strip().splitlines()[-1]
    assert "[DONE]" not in response.text
    error = orjson.loads(last.removeprefix("data: "))["error"]
    assert error["type"] == "api_error" and error["code"] == "upstream_error"


async def test_the_breaker_opens_skips_the_upstream_then_half_opens_and_closes(
    client: httpx.AsyncClient, services: Services, upstream: FakeUpstream
) -> None:
    # Settings of these tests: opens after 3 failures, 0.3 s cool-down.
    await add_models(services, upstream, ("gpt", Provider.OPENAI, {"max_retries": 0}))
    upstream.fail("up-gpt", *[Fault(status=500)] * 4)
    for _ in range(3):
        assert (await client.post("/v1/chat/completions", json=chat("gpt"))).status_code == 502
    skipped = await client.post("/v1/chat/completions", json=chat("gpt"))
    assert skipped.status_code == 503 and skipped.json()["error"]["code"] == "circuit_open"
    assert upstream.calls("up-gpt") == 3
    await asyncio.sleep(0.35)
    # Half-open: one trial goes through; it fails, so the breaker opens again.
    assert (await client.post("/v1/chat/completions", json=chat("gpt"))).status_code == 502
    assert (await client.post("/v1/chat/completions", json=chat("gpt"))).status_code == 503
    assert upstream.calls("up-gpt") == 4
    await asyncio.sleep(0.35)
    assert (await client.post("/v1/chat/completions", json=chat("gpt"))).status_code == 200
    assert (await client.post("/v1/chat/completions", json=chat("gpt"))).status_code == 200
    assert services.chat.breakers.state("gpt") == "closed"


async def test_an_open_breaker_skips_its_step_in_a_chain(
    client: httpx.AsyncClient, services: Services, upstream: FakeUpstream
) -> None:
    await add_models(services, upstream, ("a", Provider.OPENAI, {}), ("b", Provider.OPENAI, {}))
    await make_chain(client, "ab", {"model_id": "a"}, {"model_id": "b"})
    upstream.fail("up-a", *[Fault(status=500)] * 3)
    for _ in range(4):
        response = await client.post("/v1/chat/completions", json=chat("ab"))
        assert response.json()["model"] == "b"
    assert upstream.calls("up-a") == 3


def test_breaker_states_follow_failures_cool_down_and_success() -> None:
    now = [0.0]
    breakers = CircuitBreakers(threshold=2, cooldown=10, clock=lambda: now[0])
    breakers.failure("m")
    assert breakers.allow("m") and breakers.state("m") == "closed"
    breakers.failure("m")
    assert breakers.state("m") == "open" and not breakers.allow("m")
    now[0] = 10.0
    assert breakers.allow("m") and not breakers.allow("m")  # one trial only
    breakers.success("m")
    assert breakers.state("m") == "closed" and breakers.allow("m")


async def test_unknown_or_disabled_models_and_chains_are_404_never_a_fallback(
    client: httpx.AsyncClient, services: Services, upstream: FakeUpstream
) -> None:
    await add_models(services, upstream, ("gpt", Provider.OPENAI, {}))
    await make_chain(client, "c", {"model_id": "gpt"})
    assert (await client.post("/v1/chat/completions", json=chat("c"))).status_code == 200
    disabled = await client.patch("/admin/chains/c", json={"enabled": False})
    assert disabled.status_code == 200
    gone = await client.post("/v1/chat/completions", json=chat("c"))
    assert gone.status_code == 404 and gone.json()["error"]["param"] == "model"
    unknown = await client.post("/v1/chat/completions", json=chat("nothing-here"))
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "not_found_error"
    assert len(upstream.seen) == 1

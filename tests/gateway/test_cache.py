"""The response cache: what shares an entry and what never does, on memory and real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
import redis.asyncio as aioredis
from fastapi import FastAPI

from app.config import Settings
from app.core.errors import InvalidInput
from app.gateway.cache import (
    CacheBackend,
    CacheControl,
    MemoryCacheBackend,
    RedisCacheBackend,
    ResponseCache,
    build_response_cache,
    completion_chunks,
    tenant_of,
)
from app.logs.entities import ExecutionLog
from app.main import create_app
from app.models.entities import Model
from app.operations.runner import OperationRunner
from app.services import Services, build_handlers
from app.storage.memory import MemoryStorage
from app.storage.protocol import Storage
from app.usage.entities import UsageRecord, UsageType
from tests.fakes import RecordingQueue

ALICE_TEAM = tenant_of("team-a", "key-1")
BOB_TEAM = tenant_of("team-b", "key-2")


@pytest.fixture(params=["memory", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[CacheBackend]:
    if request.param == "memory":
        yield MemoryCacheBackend(max_entries=100)
        return
    client = aioredis.Redis.from_url(request.getfixturevalue("redis_url"))
    await client.flushdb()
    yield RedisCacheBackend(client)
    await client.flushdb()
    await client.aclose()


def params(text: str = "What is the capital of France?", **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], **extra}


def completion(text: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "mock",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    }


async def remember(
    cache: ResponseCache,
    request: dict[str, Any],
    answer: str,
    *,
    model: str = "mock",
    version: int = 1,
    tenant: str = ALICE_TEAM,
    control: CacheControl | None = None,
) -> None:
    lookup = await cache.lookup(
        request, model=model, config_version=version, tenant=tenant, control=control
    )
    assert not lookup.hit
    await cache.store(lookup, completion(answer))


async def answer_of(
    cache: ResponseCache,
    request: dict[str, Any],
    *,
    model: str = "mock",
    version: int = 1,
    tenant: str = ALICE_TEAM,
    control: CacheControl | None = None,
) -> str | None:
    lookup = await cache.lookup(
        request, model=model, config_version=version, tenant=tenant, control=control
    )
    if lookup.response is None:
        return None
    return str(lookup.response["choices"][0]["message"]["content"])


# ---- exact cache ------------------------------------------------------------------------------


async def test_the_same_request_hits_and_reports_it(backend: CacheBackend) -> None:
    cache = ResponseCache(backend)
    request = params(temperature=0)
    first = await cache.lookup(request, model="mock", config_version=1, tenant=ALICE_TEAM)
    assert first.status == "miss" and first.headers() == {"x-gateway-cache": "miss"}
    assert await cache.store(first, completion("Paris"))
    again = await cache.lookup(dict(request), model="mock", config_version=1, tenant=ALICE_TEAM)
    assert again.status == "hit" and again.headers() == {"x-gateway-cache": "hit"}
    assert again.response == completion("Paris")
    assert not await cache.store(again, completion("other")), "a hit is never stored again"


@pytest.mark.parametrize(
    "change",
    [
        {"temperature": 0.7},
        {"top_p": 0.5},
        {"max_tokens": 5},
        {"max_completion_tokens": 5},
        {"stop": ["\n"]},
        {"seed": 7},
        {"n": 2},
        {"presence_penalty": 1.0},
        {"frequency_penalty": 1.0},
        {"logit_bias": {"50256": -100}},
        {"response_format": {"type": "json_object"}},
        {"tools": [{"type": "function", "function": {"name": "f"}}]},
        {"tool_choice": "none"},
        {"logprobs": True},
        {"reasoning_effort": "low"},  # a parameter this code has never heard of counts too
        {"messages": [{"role": "user", "content": "What is the capital of Spain?"}]},
        {"messages": [{"role": "system", "content": "Be terse."}, *params()["messages"]]},
    ],
)
async def test_a_different_parameter_never_shares_an_entry(
    backend: CacheBackend, change: dict[str, Any]
) -> None:
    cache = ResponseCache(backend)
    await remember(cache, params(temperature=0), "Paris")
    assert await answer_of(cache, {**params(temperature=0), **change}) is None


async def test_parameters_that_cannot_change_the_answer_still_share_it(
    backend: CacheBackend,
) -> None:
    cache = ResponseCache(backend)
    await remember(cache, params(), "Paris")
    same = params(user="someone", stream=True, stream_options={"include_usage": True})
    assert await answer_of(cache, {**same, "metadata": {"trace": "x"}}) == "Paris"
    reordered = {"messages": params()["messages"]}  # key order is irrelevant
    assert await answer_of(cache, reordered) == "Paris"


async def test_models_config_versions_and_teams_never_share_an_entry(
    backend: CacheBackend,
) -> None:
    cache = ResponseCache(backend)
    await remember(cache, params(), "Paris")
    assert await answer_of(cache, params(), model="mock-slow") is None
    assert await answer_of(cache, params(), version=2) is None
    assert await answer_of(cache, params(), tenant=BOB_TEAM) is None
    # Keys without a team are tenants of their own.
    assert await answer_of(cache, params(), tenant=tenant_of(None, "key-1")) is None
    await remember(cache, params(), "Paris (no team)", tenant=tenant_of(None, "key-1"))
    assert await answer_of(cache, params(), tenant=tenant_of(None, "key-2")) is None
    assert await answer_of(cache, params()) == "Paris"


async def test_no_store_neither_reads_nor_stores(backend: CacheBackend) -> None:
    cache = ResponseCache(backend)
    await remember(cache, params(), "Paris")
    no_store = CacheControl.parse("no-store")
    lookup = await cache.lookup(
        params(), model="mock", config_version=1, tenant=ALICE_TEAM, control=no_store
    )
    assert lookup.status == "bypass" and lookup.response is None
    other = params("Something else")
    lookup = await cache.lookup(
        other, model="mock", config_version=1, tenant=ALICE_TEAM, control=no_store
    )
    assert not await cache.store(lookup, completion("x"))
    assert await answer_of(cache, other) is None, "no-store must leave nothing behind"


async def test_no_cache_skips_the_read_but_refreshes_the_entry(backend: CacheBackend) -> None:
    cache = ResponseCache(backend)
    await remember(cache, params(), "Paris (old)")
    no_cache = CacheControl.parse("no-cache")
    lookup = await cache.lookup(
        params(), model="mock", config_version=1, tenant=ALICE_TEAM, control=no_cache
    )
    assert lookup.status == "bypass" and lookup.response is None
    assert await cache.store(lookup, completion("Paris (new)"))
    assert await answer_of(cache, params()) == "Paris (new)"


async def test_max_age_sets_the_entrys_lifetime(backend: CacheBackend) -> None:
    cache = ResponseCache(backend, ttl=3600)
    await remember(cache, params(), "short", control=CacheControl.parse("max-age=1"))
    await remember(cache, params("long"), "long")
    assert await answer_of(cache, params()) == "short"
    await asyncio.sleep(1.1)
    assert await answer_of(cache, params()) is None
    assert await answer_of(cache, params("long")) == "long"
    lookup = await cache.lookup(
        params("zero"),
        model="mock",
        config_version=1,
        tenant=ALICE_TEAM,
        control=CacheControl.parse("max-age=0"),
    )
    assert not await cache.store(lookup, completion("never kept"))


def test_cache_control_is_parsed_and_a_bad_max_age_names_the_header() -> None:
    control = CacheControl.parse("No-Cache, max-age=30, private")
    assert control == CacheControl(no_cache=True, no_store=False, max_age=30.0)
    assert CacheControl.parse(None) == CacheControl()
    with pytest.raises(InvalidInput) as caught:
        CacheControl.parse("max-age=soon")
    assert caught.value.param == "Cache-Control"


async def test_an_unreachable_cache_store_answers_miss_instead_of_failing() -> None:
    client = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    cache = ResponseCache(RedisCacheBackend(client), timeout=0.3)
    lookup = await cache.lookup(params(), model="mock", config_version=1, tenant=ALICE_TEAM)
    assert lookup.status == "miss"
    assert not await cache.store(lookup, completion("Paris"))
    await client.aclose()


# ---- semantic cache ---------------------------------------------------------------------------

# Hand-made embeddings: the similarity of two questions is chosen by the test, not a model.
VECTORS = {
    "What is the capital of France?": [1.0, 0.0, 0.0],
    "Tell me France's capital.": [0.99, 0.141, 0.0],  # cosine ≈ 0.990
    "Which city is France's capital?": [0.9, 0.436, 0.0],  # cosine ≈ 0.900
    "How tall is Everest?": [0.0, 0.0, 1.0],
}


class FakeEmbedder:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    async def __call__(self, texts: list[str]) -> list[list[float]]:
        self.calls.append(texts)
        return [VECTORS[text.removeprefix("user: ")] for text in texts]


def semantic(backend: CacheBackend, threshold: float = 0.95) -> ResponseCache:
    return ResponseCache(backend, embed=FakeEmbedder(), semantic_threshold=threshold)


async def test_a_similar_question_hits_above_the_threshold_and_reports_the_similarity(
    backend: CacheBackend,
) -> None:
    cache = semantic(backend, threshold=0.95)
    await remember(cache, params("What is the capital of France?"), "Paris")
    lookup = await cache.lookup(
        params("Tell me France's capital."), model="mock", config_version=1, tenant=ALICE_TEAM
    )
    assert lookup.status == "hit" and lookup.response == completion("Paris")
    assert lookup.similarity is not None and 0.985 < lookup.similarity < 0.995
    assert lookup.headers()["x-gateway-cache-similarity"] == f"{lookup.similarity:.4f}"
    below = await cache.lookup(
        params("Which city is France's capital?"), model="mock", config_version=1, tenant=ALICE_TEAM
    )
    assert below.status == "miss" and below.response is None
    assert await answer_of(cache, params("How tall is Everest?")) is None


async def test_a_lower_threshold_accepts_a_less_similar_question(backend: CacheBackend) -> None:
    cache = semantic(backend, threshold=0.85)
    await remember(cache, params("What is the capital of France?"), "Paris")
    assert await answer_of(cache, params("Which city is France's capital?")) == "Paris"


async def test_semantic_hits_stay_within_the_team_model_version_and_parameters(
    backend: CacheBackend,
) -> None:
    cache = semantic(backend)
    await remember(cache, params("What is the capital of France?"), "Paris")
    similar = params("Tell me France's capital.")
    assert await answer_of(cache, similar, tenant=BOB_TEAM) is None
    assert await answer_of(cache, similar, model="other") is None
    assert await answer_of(cache, similar, version=2) is None
    assert await answer_of(cache, {**similar, "temperature": 1.5}) is None
    assert await answer_of(cache, similar) == "Paris"


async def test_the_semantic_cache_keeps_a_bounded_set_per_scope() -> None:
    backend = MemoryCacheBackend()
    cache = ResponseCache(backend, embed=FakeEmbedder(), semantic_max_entries=2)
    for text in ("What is the capital of France?", "How tall is Everest?"):
        await remember(cache, params(text), text)
    await remember(cache, params("Which city is France's capital?"), "third")
    scope = (await cache.lookup(params(), model="mock", config_version=1, tenant=ALICE_TEAM)).scope
    assert scope is not None and len(await backend.vectors(scope)) == 2


async def test_a_failing_embedder_degrades_to_the_exact_cache(backend: CacheBackend) -> None:
    async def broken(texts: list[str]) -> list[list[float]]:
        raise ConnectionError("embedding model down")

    cache = ResponseCache(backend, embed=broken)
    await remember(cache, params(), "Paris")
    assert await answer_of(cache, params()) == "Paris"
    assert await answer_of(cache, params("Tell me France's capital.")) is None


# ---- streaming from cache and settings --------------------------------------------------------


def test_a_cached_completion_streams_as_role_content_finish_and_usage_chunks() -> None:
    chunks = list(completion_chunks(completion("The capital is Paris"), include_usage=True))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "The capital is Paris"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 7
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    without_usage = list(completion_chunks(completion("Paris")))
    assert "usage" not in without_usage[-1]


def test_the_settings_choose_the_backend_and_turn_semantic_on_only_with_a_model() -> None:
    assert build_response_cache(Settings(), redis=None) is None
    memory = build_response_cache(
        Settings(CACHE_BACKEND="memory"),
        redis=None,
        embed=FakeEmbedder(),
    )
    assert memory is not None and not memory.semantic
    with_model = build_response_cache(
        Settings(CACHE_BACKEND="redis", CACHE_SEMANTIC_MODEL="embed"),
        redis=object(),
        embed=FakeEmbedder(),
    )
    assert with_model is not None and with_model.semantic


# ---- through the chat endpoint ----------------------------------------------------------------


@pytest.fixture
async def cached_app(backend: CacheBackend) -> AsyncIterator[FastAPI]:
    """The app with the response cache on, over each backend; routes are re-read every call."""
    storage = MemoryStorage()
    queue = RecordingQueue(storage)
    settings = Settings(BROKER="stub", CACHE_BACKEND="memory", ROUTE_CACHE_SECONDS=0)
    application = create_app(settings, storage=storage, queue=queue)
    async with application.router.lifespan_context(application):
        services: Services = application.state.services
        assert services.calls.cache is not None  # the settings turned it on
        services.calls.cache = ResponseCache(backend)
        application.state.queue = queue
        yield application


async def http_for(app: FastAPI, team_id: str | None = None) -> httpx.AsyncClient:
    services: Services = app.state.services
    _, secret = await services.keys.create_key(name="cache client", team_id=team_id)
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://gateway",
        headers={"Authorization": f"Bearer {secret}"},
    )


def chat_body(text: str = "hello cache", **extra: Any) -> dict[str, Any]:
    return {"model": "mock", "messages": [{"role": "user", "content": text}], **extra}


async def test_the_endpoint_reports_miss_then_hit_and_obeys_cache_control(
    cached_app: FastAPI,
) -> None:
    async with await http_for(cached_app) as http:
        first = await http.post("/v1/chat/completions", json=chat_body())
        assert first.status_code == 200 and first.headers["x-gateway-cache"] == "miss"
        second = await http.post("/v1/chat/completions", json=chat_body(user="someone"))
        assert second.headers["x-gateway-cache"] == "hit" and second.json() == first.json()
        other = await http.post("/v1/chat/completions", json=chat_body(temperature=1.0))
        assert other.headers["x-gateway-cache"] == "miss"
        for directive in ("no-cache", "no-store"):
            bypass = await http.post(
                "/v1/chat/completions", json=chat_body(), headers={"Cache-Control": directive}
            )
            assert bypass.headers["x-gateway-cache"] == "bypass"
        unstored = await http.post(
            "/v1/chat/completions", json=chat_body("never"), headers={"Cache-Control": "no-store"}
        )
        assert unstored.headers["x-gateway-cache"] == "bypass"
        after = await http.post("/v1/chat/completions", json=chat_body("never"))
        assert after.headers["x-gateway-cache"] == "miss"
        bad = await http.post(
            "/v1/chat/completions", json=chat_body(), headers={"Cache-Control": "max-age=x"}
        )
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "Cache-Control"


async def test_a_streaming_request_is_served_from_a_cached_completion(
    cached_app: FastAPI,
) -> None:
    async with await http_for(cached_app) as http:
        direct = await http.post("/v1/chat/completions", json=chat_body())
        content = direct.json()["choices"][0]["message"]["content"]
        streamed = await http.post(
            "/v1/chat/completions",
            json=chat_body(stream=True, stream_options={"include_usage": True}),
        )
        assert streamed.headers["x-gateway-cache"] == "hit"
        events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [orjson.loads(e) for e in events[:-1]]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        assert text == content
        assert chunks[-1]["usage"] == direct.json()["usage"]


async def test_keys_of_different_teams_never_share_and_keys_of_one_team_do(
    cached_app: FastAPI,
) -> None:
    services: Services = cached_app.state.services
    team_a = (await services.teams.create_team(name="a")).id
    team_b = (await services.teams.create_team(name="b")).id
    async with (
        await http_for(cached_app, team_a) as alice,
        await http_for(cached_app, team_a) as alice_colleague,
        await http_for(cached_app, team_b) as bob,
        await http_for(cached_app) as loner,
    ):
        await alice.post("/v1/chat/completions", json=chat_body())
        shared = await alice_colleague.post("/v1/chat/completions", json=chat_body())
        assert shared.headers["x-gateway-cache"] == "hit"
        for outsider in (bob, loner):
            response = await outsider.post("/v1/chat/completions", json=chat_body())
            assert response.headers["x-gateway-cache"] == "miss"


async def test_a_new_config_version_of_the_model_misses(cached_app: FastAPI) -> None:
    services: Services = cached_app.state.services
    async with await http_for(cached_app) as http:
        await http.post("/v1/chat/completions", json=chat_body())
        async with services.storage.unit_of_work() as uow:
            model = await uow.repo(Model).get("mock")
            assert model is not None
            model.config_version += 1
            await uow.repo(Model).update(model)
            await uow.commit()
        again = await http.post("/v1/chat/completions", json=chat_body())
        assert again.headers["x-gateway-cache"] == "miss"


async def test_an_async_job_goes_through_the_same_cache(cached_app: FastAPI) -> None:
    services: Services = cached_app.state.services
    queue: RecordingQueue = cached_app.state.queue
    async with await http_for(cached_app) as http:
        accepted = await http.post("/v1/chat/completions?async=true", json=chat_body("by job"))
        assert accepted.status_code == 202
        runner = OperationRunner(services.storage, queue, build_handlers(services))
        assert await runner.execute(queue.sent[-1].operation_id)
        direct = await http.post("/v1/chat/completions", json=chat_body("by job"))
        assert direct.headers["x-gateway-cache"] == "hit"
        job = await http.get(f"/v1/operations/{accepted.json()['operation_id']}")
        assert job.json()["result"] == direct.json()


# ---- the semantic cache's own embeddings ------------------------------------------------------


async def test_the_semantic_caches_embeddings_are_recorded_as_the_gateways_own_usage(
    storage: Storage,
) -> None:
    # A semantic lookup calls the embedding model: an upstream call like any, so it leaves a
    # usage record and a log, with no key or team (the caller is billed for its chat only).
    settings = Settings(
        BROKER="stub", CACHE_BACKEND="memory", CACHE_SEMANTIC_MODEL="mock-embedding"
    )
    application = create_app(settings, storage=storage, queue=RecordingQueue(storage))
    async with application.router.lifespan_context(application):
        async with await http_for(application) as http:
            first = await http.post("/v1/chat/completions", json=chat_body("a question"))
            again = await http.post("/v1/chat/completions", json=chat_body("a question, again"))
        assert first.status_code == again.status_code == 200, (first.text, again.text)
        assert again.headers["x-gateway-cache"] == "miss"  # not similar enough, still looked up
        async with storage.unit_of_work() as uow:
            records = (await uow.repo(UsageRecord).find(order_by=["created_at"])).items
            logs = await uow.repo(ExecutionLog).count()
    chats = [r for r in records if r.usage_type == UsageType.CHAT_COMPLETION]
    embeddings = [r for r in records if r.usage_type == UsageType.EMBEDDING]
    assert len(chats) == 2 and all(r.api_key_id is not None for r in chats)
    assert len(embeddings) == 2  # one lookup per call
    assert {(r.api_key_id, r.team_id, r.model_id) for r in embeddings} == {
        (None, None, "mock-embedding")
    }
    assert all(r.input_tokens > 0 for r in embeddings)
    assert logs == len(records) == 4

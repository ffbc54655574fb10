"""The HTTP surface: validation, the official `openai` SDK, chains admin, and disconnects."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
import uvicorn

from app.credentials.entities import Provider
from app.main import create_app
from app.services import Services
from app.storage.memory import MemoryStorage
from app.storage.protocol import Storage
from tests.fakes import RecordingQueue
from tests.gateway.conftest import ADMIN, add_models, chat, gateway_settings, store_models
from tests.gateway.upstream import FakeUpstream, Fault, free_port

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": -0.1}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        (
            {"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
            "tools.0.function.name",
        ),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"seed": "abc"}, "seed"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ({"tools": [TOOL], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [TOOL], "tool_choice": {"type": "function"}}, "tool_choice"),
        (
            {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "other"}}},
            "tool_choice",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
            "tools.0.function.parameters",
        ),
        (  # a schema the mock cannot follow
            {
                "tools": [
                    TOOL,
                    {"type": "function", "function": {"name": "g", "parameters": {"type": "t"}}},
                ],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            "tools.1.function.parameters",
        ),
        ({"parallel_tool_calls": "maybe"}, "parallel_tool_calls"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 1}}},
            "response_format.json_schema.schema",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/missing"}},
                }
            },
            "response_format.json_schema.schema",
        ),
    ],
)
async def test_out_of_range_parameters_are_400_naming_the_field(
    client: httpx.AsyncClient, extra: dict[str, Any], param: str
) -> None:
    response = await client.post("/v1/chat/completions", json=chat("mock", **extra))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param


async def test_async_requests_run_the_same_validation_and_resolution(
    client: httpx.AsyncClient,
) -> None:
    bad = await client.post("/v1/chat/completions?async=true", json=chat("mock", top_logprobs=2))
    assert bad.status_code == 400
    unknown = await client.post("/v1/chat/completions?async=true", json=chat("nope"))
    assert unknown.status_code == 404
    accepted = await client.post("/v1/chat/completions?async=true", json=chat("mock"))
    assert accepted.status_code == 202


async def test_a_completion_names_the_gateway_model_that_answered(services: Services) -> None:
    route = await services.chat.resolve("mock")
    answer = await services.chat.call(route, {"messages": chat("mock")["messages"]})
    assert answer.model_id == "mock"
    assert answer.body["model"] == "mock" and answer.body["object"] == "chat.completion"


async def test_mock_behaviour_comes_from_model_parameters(
    client: httpx.AsyncClient, services: Services, upstream: FakeUpstream
) -> None:
    await add_models(
        services,
        upstream,
        (
            "fake",
            Provider.MOCK,
            {"mock_completion_tokens": 7, "mock_prompt_tokens": 100, "mock_failure_rate": 0},
        ),
    )
    body = (await client.post("/v1/chat/completions", json=chat("fake"))).json()
    assert body["usage"] == {"prompt_tokens": 100, "completion_tokens": 7, "total_tokens": 107}
    async with services.storage.unit_of_work() as uow:
        from app.models.entities import Model

        model = await uow.repo(Model).get("fake")
        assert model is not None
        model.parameters = {"mock_failure_rate": 1, "mock_failure": "rate_limit"}
        await uow.repo(Model).update(model)
        await uow.commit()
    services.chat.invalidate("fake")
    limited = await client.post("/v1/chat/completions", json=chat("fake"))
    assert limited.status_code == 429


# --- chains admin, on both storage backends ------------------------------------------------


@pytest.fixture
async def admin_client(storage: Storage) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(gateway_settings(), storage=storage, queue=RecordingQueue(storage))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
            yield http


async def test_chain_admin_crud_checks_steps_and_requires_admin(
    admin_client: httpx.AsyncClient,
) -> None:
    admin = {"Authorization": f"Bearer {ADMIN}"}
    chain = {
        "id": "fallback",
        "name": "Fallback",
        "steps": [{"model_id": "mock", "max_retries": 2}],
    }
    created = await admin_client.post("/admin/chains", json=chain, headers=admin)
    assert created.status_code == 201, created.text
    assert created.json()["steps"][0] == {
        "model_id": "mock",
        "max_retries": 2,
        "backoff_ms": 200,
        "latency_threshold_ms": None,
    }
    again = await admin_client.post("/admin/chains", json=chain, headers=admin)
    assert again.status_code == 409
    missing = {**chain, "id": "other", "steps": [{"model_id": "mock"}, {"model_id": "ghost"}]}
    bad = await admin_client.post("/admin/chains", json=missing, headers=admin)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "steps.1.model_id"
    shadow = await admin_client.post("/admin/chains", json={**chain, "id": "mock"}, headers=admin)
    assert shadow.status_code == 409
    listed = await admin_client.get("/admin/chains", headers=admin)
    assert [c["id"] for c in listed.json()["data"]] == ["fallback"]
    used = await admin_client.post("/v1/chat/completions", json=chat("fallback"), headers=admin)
    assert used.status_code == 200 and used.json()["model"] == "mock"
    renamed = await admin_client.patch("/admin/chains/fallback", json={"name": "F"}, headers=admin)
    assert renamed.json()["name"] == "F"
    assert (await admin_client.delete("/admin/chains/fallback", headers=admin)).status_code == 204
    assert (await admin_client.get("/admin/chains/fallback", headers=admin)).status_code == 404

    services = admin_client._transport.app.state.services  # type: ignore[attr-defined]
    _, secret = await services.keys.create_key(name="plain")
    user = {"Authorization": f"Bearer {secret}"}
    for method, path in [
        ("GET", "/admin/chains"),
        ("POST", "/admin/chains"),
        ("GET", "/admin/chains/x"),
        ("PATCH", "/admin/chains/x"),
        ("DELETE", "/admin/chains/x"),
    ]:
        response = await admin_client.request(method, path, headers=user, json={})
        assert response.status_code == 403, (method, path)


# --- the official SDK ------------------------------------------------------------------------


async def test_the_sdk_chats_streams_lists_models_and_embeds(sdk: openai.AsyncOpenAI) -> None:
    completion = await sdk.chat.completions.create(
        model="mock", messages=[{"role": "user", "content": "hi there"}]
    )
    assert completion.model == "mock"
    assert completion.choices[0].message.content == "Mock reply to: hi there"
    stream = await sdk.chat.completions.create(
        model="mock",
        messages=[{"role": "user", "content": "hi there"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, usage = [], None
    async for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert "".join(parts) == "Mock reply to: hi there"
    assert usage is not None and usage.completion_tokens == 5
    models = [m.id async for m in sdk.models.list()]
    assert "mock" in models
    assert (await sdk.models.retrieve("mock")).id == "mock"
    embedding = await sdk.embeddings.create(model="mock-embedding", input=["one", "two"])
    assert len(embedding.data) == 2 and len(embedding.data[0].embedding) == 256


async def test_the_sdk_raises_the_matching_error_classes(
    sdk: openai.AsyncOpenAI, services: Services, upstream: FakeUpstream
) -> None:
    await add_models(services, upstream, ("gpt", Provider.OPENAI, {}))
    messages: Any = [{"role": "user", "content": "x"}]
    with pytest.raises(openai.NotFoundError):
        await sdk.chat.completions.create(model="no-such-model", messages=messages)
    with pytest.raises(openai.BadRequestError) as bad:
        await sdk.chat.completions.create(model="mock", messages=messages, temperature=9)
    assert bad.value.param == "temperature"  # type: ignore[attr-defined]
    upstream.fail("up-gpt", Fault(status=429), Fault(status=401))
    with pytest.raises(openai.RateLimitError):
        await sdk.chat.completions.create(model="gpt", messages=messages)
    with pytest.raises(openai.AuthenticationError):
        await sdk.chat.completions.create(model="gpt", messages=messages)
    with pytest.raises(openai.AuthenticationError):
        await sdk.with_options(api_key="gw-wrong").chat.completions.create(
            model="mock", messages=messages
        )
    upstream.fail("up-gpt", Fault(error_after_chunks=1))
    stream = await sdk.chat.completions.create(model="gpt", messages=messages, stream=True)
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass


# --- client disconnect ---------------------------------------------------------------------


@pytest.fixture
async def served(upstream: FakeUpstream) -> AsyncIterator[str]:
    """The app served by uvicorn on a loopback port, in a thread with its own loop."""
    storage = MemoryStorage()
    await store_models(storage, upstream, ("gpt", Provider.OPENAI, {}))
    app = create_app(gateway_settings(UPSTREAM_TIMEOUT_SECONDS=5.0), storage=storage)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        await asyncio.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    await asyncio.to_thread(thread.join, 10)


async def test_a_client_disconnect_cancels_the_upstream_stream(
    served: str, upstream: FakeUpstream
) -> None:
    upstream.word_delay = 0.05
    headers = {"Authorization": f"Bearer {ADMIN}"}
    async with (
        httpx.AsyncClient(base_url=served, headers=headers) as http,
        http.stream("POST", "/v1/chat/completions", json=chat("gpt", stream=True)) as response,
    ):
        assert response.status_code == 200
        async for _ in response.aiter_lines():
            break
    for _ in range(40):
        if upstream.disconnects:
            break
        await asyncio.sleep(0.05)
    assert upstream.disconnects == ["up-gpt"]

"""Each provider adapter against a real loopback upstream, through `/v1/chat/completions`."""

from __future__ import annotations

import base64
import struct

import httpx
import orjson
import pytest

from app.credentials.entities import Provider
from app.models.entities import ModelKind
from app.services import Services
from tests.gateway.conftest import UPSTREAM_SECRET, add_models, chat
from tests.gateway.upstream import FakeUpstream, Fault


def sse(text: str) -> list[dict[str, object] | str]:
    events: list[dict[str, object] | str] = []
    for line in text.splitlines():
        if line.startswith("data: "):
            data = line[6:]
            events.append(data if data == "[DONE]" else orjson.loads(data))
    return events


async def test_openai_adapter_sends_provider_model_secret_and_defaults(
    client: httpx.AsyncClient, services: Services, upstream: FakeUpstream
) -> None:
    await add_models(services, upstream, ("gpt", Provider.OPENAI, {"temperature": 0.3}))
    response = await client.post("/v1/chat/completions", json=chat("gpt", top_p=0.5))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "gpt" and response.headers["x-gateway-model"] == "gpt"
    assert body["choices"][0]["message"]["content"] == "echo: hello world"
    assert body["usage"]["total_tokens"] == 10
    (seen,) = upstream.seen
    assert seen.body["model"] == "up-gpt"
    assert seen.body["temperature"] == 0.3 and seen.body["top_p"] == 0.5
    assert seen.headers["Authorization"] == f"Bearer {UPSTREAM_SECRET}"
    assert UPSTREAM_SECRET not in response.text


async def test_openai_stream_relays_chunks_and_usage_only_when_asked(
    client: httpx.AsyncClient, services: Services, upstream: FakeUpstream
) -> None:
    await add_models(services, upstream, ("gpt", Provider.OPENAI, {}))
    plain = await client.post("/v1/chat/completions", json=chat("gpt", stream=True))
    events = sse(plain.text)
    assert plain.headers["content-type"].startswith("text/event-stream")
    assert events[-1] == "[DONE]"
    chunks = [e for e in events if isinstance(e, dict)]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"  # type: ignore[index]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)  # type: ignore[index,union-attr]
    assert text == "echo: hello world"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"  # type: ignore[index]
    assert all(c["model"] == "gpt" and "usage" not in c for c in chunks)
    # Usage is always asked of the upstream, so it can be accounted for.
    assert upstream.seen[0].body["stream_options"] == {"include_usage": True}

    with_usage = await client.post(
        "/v1/chat/completions",
        json=chat("gpt", stream=True, stream_options={"include_usage": True}),
    )
    chunks = [e for e in sse(with_usage.text) if isinstance(e, dict)]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 10  # type: ignore[index]


async def test_anthropic_adapter_translates_request_and_response(
    client: httpx.AsyncClient, services: Services, upstream: FakeUpstream
) -> None:
    await add_models(services, upstream, ("claude", Provider.ANTHROPIC, {}))
    request = {
        "model": "claude",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "first"},
            {"role": "user", "content": [{"type": "text", "text": "second"}]},
        ],
        "stop": "END",
        "temperature": 1.5,
    }
    response = await client.post("/v1/chat/completions", json=request)
    assert response.status_code == 200, response.text
    (seen,) = upstream.seen
    assert seen.path == "/v1/messages"
    assert seen.headers["x-api-key"] == UPSTREAM_SECRET
    assert seen.headers["anthropic-version"] == "2023-06-01"
    assert seen.body["system"] == "Be brief."
    assert seen.body["messages"] == [
        {
            "role": "user",
            "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}],
        }
    ]
    assert seen.body["stop_sequences"] == ["END"] and seen.body["temperature"] == 1.0
    assert seen.body["max_tokens"] == 4096
    body = response.json()
    assert body["model"] == "claude" and body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == "echo: first second"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 13, "completion_tokens": 4, "total_tokens": 17}


async def test_anthropic_stop_reasons_and_tool_calls_come_back_in_openai_terms(
    client: httpx.AsyncClient, services: Services, upstream: FakeUpstream
) -> None:
    await add_models(services, upstream, ("claude", Provider.ANTHROPIC, {}))
    short = await client.post("/v1/chat/completions", json=chat("claude", max_tokens=2))
    assert short.json()["choices"][0]["finish_reason"] == "length"
    tool = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
    answer = await client.post(
        "/v1/chat/completions", json=chat("claude", tools=[tool], tool_choice="required")
    )
    choice = answer.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    call = choice["message"]["tool_calls"][0]
    assert call["function"]["name"] == "weather"
    assert orjson.loads(call["function"]["arguments"]) == {"city": "Paris"}
    sent = upstream.seen[-1].body
    assert sent["tools"][0]["input_schema"] == {"type": "object"}
    assert sent["tool_choice"] == {"type": "any"}


async def test_anthropic_stream_events_become_openai_chunks(
    client: httpx.AsyncClient, services: Services, upstream: FakeUpstream
) -> None:
    await add_models(services, upstream, ("claude", Provider.ANTHROPIC, {}))
    response = await client.post(
        "/v1/chat/completions",
        json=chat("claude", stream=True, stream_options={"include_usage": True}),
    )
    events = sse(response.text)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events if isinstance(e, dict)]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}  # type: ignore[index]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])  # type: ignore[index,union-attr]
    assert text == "echo: hello world"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"  # type: ignore[index]
    assert chunks[-1]["usage"] == {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
    assert {c["model"] for c in chunks} == {"claude"}


async def test_azure_adapter_uses_deployment_url_api_version_and_api_key(
    client: httpx.AsyncClient, services: Services, upstream: FakeUpstream
) -> None:
    await add_models(services, upstream, ("azure-gpt", Provider.AZURE_OPENAI, {}))
    response = await client.post("/v1/chat/completions", json=chat("azure-gpt"))
    assert response.status_code == 200, response.text
    (seen,) = upstream.seen
    assert seen.path == "/openai/deployments/up-azure-gpt/chat/completions"
    assert seen.query == {"api-version": "2024-06-01"}
    assert seen.headers["api-key"] == UPSTREAM_SECRET and "Authorization" not in seen.headers
    assert "model" not in seen.body
    assert response.json()["model"] == "azure-gpt"


@pytest.mark.parametrize(
    ("status", "answered", "error_type"),
    [
        (400, 400, "invalid_request_error"),
        (401, 401, "authentication_error"),
        (403, 403, "permission_error"),
        (404, 404, "not_found_error"),
        (429, 429, "rate_limit_error"),
        (500, 502, "api_error"),
        (503, 502, "api_error"),
    ],
)
async def test_upstream_errors_map_to_the_matching_status_and_type(
    client: httpx.AsyncClient,
    services: Services,
    upstream: FakeUpstream,
    status: int,
    answered: int,
    error_type: str,
) -> None:
    await add_models(services, upstream, ("gpt", Provider.OPENAI, {}))
    upstream.fail("up-gpt", Fault(status=status, message=f"bad key {UPSTREAM_SECRET}"))
    response = await client.post("/v1/chat/completions", json=chat("gpt"))
    assert response.status_code == answered
    assert response.json()["error"]["type"] == error_type
    assert UPSTREAM_SECRET not in response.text  # an upstream echoing our key is scrubbed


async def test_upstream_timeout_is_504(
    client: httpx.AsyncClient, services: Services, upstream: FakeUpstream
) -> None:
    await add_models(services, upstream, ("slow", Provider.OPENAI, {"timeout_s": 0.2}))
    upstream.fail("up-slow", Fault(delay=1.0))
    response = await client.post("/v1/chat/completions", json=chat("slow"))
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "upstream_timeout"


async def test_embeddings_from_an_openai_upstream_keep_input_order(
    client: httpx.AsyncClient, services: Services, upstream: FakeUpstream
) -> None:
    await add_models(services, upstream, ("emb", Provider.OPENAI, {}), kind=ModelKind.EMBEDDING)
    response = await client.post("/v1/embeddings", json={"model": "emb", "input": ["a", "bbb"]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [d["embedding"][0] for d in body["data"]] == [1.0, 3.0]
    assert body["model"] == "emb" and body["usage"]["prompt_tokens"] == 2
    assert upstream.seen[0].body["model"] == "up-emb"


async def test_mock_embeddings_are_deterministic_normalised_and_base64_encodable(
    client: httpx.AsyncClient,
) -> None:
    request = {"model": "mock-embedding", "input": ["the cat sat", "the cat sat", "dogs run"]}
    floats = (await client.post("/v1/embeddings", json=request)).json()["data"]
    first, same, other = (d["embedding"] for d in floats)
    assert first == same and first != other
    assert abs(sum(v * v for v in first) - 1.0) < 1e-9
    encoded = await client.post("/v1/embeddings", json={**request, "encoding_format": "base64"})
    raw = base64.b64decode(encoded.json()["data"][0]["embedding"])
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert all(abs(a - b) < 1e-6 for a, b in zip(decoded, first, strict=True))


async def test_a_chat_model_is_refused_by_embeddings_and_the_reverse(
    client: httpx.AsyncClient,
) -> None:
    wrong = await client.post("/v1/embeddings", json={"model": "mock", "input": "x"})
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "model"
    reverse = await client.post("/v1/chat/completions", json=chat("mock-embedding"))
    assert reverse.status_code == 400 and reverse.json()["error"]["param"] == "model"

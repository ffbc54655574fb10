"""Input that JSON allows but nothing downstream can hold (integers past 64 bits, numbers
past a double, lone UTF-16 surrogates, control characters in a model name): refused with a 400
naming the field on every path (direct, streamed, as a job, as a batch line, embeddings), never
a 500 later on."""

from __future__ import annotations

import json
import math
from typing import Any

import httpx
import pytest

from app.core.errors import InvalidInput
from app.core.jsonvalues import (
    INT64_MAX,
    INT64_MIN,
    LONE_SURROGATE,
    NOT_FINITE,
    OUT_OF_INT64,
    unencodable,
)
from app.gateway.schemas import MAX_TOKENS, ChatCompletionRequest
from app.main import create_app
from app.storage.protocol import Storage
from tests.fakes import RecordingQueue
from tests.gateway.conftest import ADMIN, chat, gateway_settings

HUGE = 10**40


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"max_tokens": HUGE}, "max_tokens"),
        ({"max_completion_tokens": 2**63}, "max_completion_tokens"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"some_vendor_option": HUGE}, "some_vendor_option"),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {"type": "integer", "maximum": HUGE},
                        },
                    }
                ]
            },
            "tools.0.function.parameters.maximum",
        ),
    ],
)
@pytest.mark.parametrize("run_async", [False, True])
async def test_integers_past_64_bits_are_400_naming_the_field(
    client: httpx.AsyncClient, extra: dict[str, Any], param: str, run_async: bool
) -> None:
    url = "/v1/chat/completions" + ("?async=true" if run_async else "")
    response = await client.post(url, json=chat("mock", **extra))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param


async def test_the_64_bit_bounds_themselves_are_accepted(client: httpx.AsyncClient) -> None:
    body = chat("mock", seed=INT64_MIN, some_vendor_option=INT64_MAX)
    assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
    assert (await client.post("/v1/chat/completions?async=true", json=body)).status_code == 202


def test_the_job_path_refuses_them_too() -> None:
    # A batch line or a stored job is checked by the same `check()` the API calls.
    request = ChatCompletionRequest.model_validate(chat("mock", seed=HUGE))
    with pytest.raises(InvalidInput) as refused:
        request.check()
    assert refused.value.param == "seed"


def test_unencodable_passes_booleans_finite_floats_and_text_with_surrogate_pairs() -> None:
    fine = {"a": True, "b": 1e300, "c": str(HUGE), "d": [1, {"e": -1}], "f": "\U0001f600 é"}
    assert unencodable(fine) is None


def test_unencodable_names_the_first_value_that_cannot_go_on() -> None:
    assert unencodable({"a": [0, {"b": HUGE}]}) == ("a.1.b", OUT_OF_INT64)
    assert unencodable({"a": [1.0, float("-inf")]}) == ("a.1", NOT_FINITE)
    assert unencodable({"a": {"b": ["ok", "x\ud800"]}}) == ("a.b.1", LONE_SURROGATE)
    # A key that is such text is named escaped, so the error can be sent as JSON.
    assert unencodable({"a": {"x\udc00": 1}}) == ("a.x\\udc00", LONE_SURROGATE)


@pytest.mark.parametrize(
    ("url", "body"),
    [
        ("/v1/chat/completions", chat("mo\x00ck")),
        ("/v1/chat/completions?async=true", chat("mock\n")),
        ("/v1/embeddings", {"model": "mock-\x00embedding", "input": "hi"}),
    ],
)
async def test_control_characters_in_a_model_name_are_400_naming_model(
    client: httpx.AsyncClient, url: str, body: dict[str, Any]
) -> None:
    response = await client.post(url, json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "model"


async def test_a_huge_max_tokens_is_a_400_even_when_a_budget_would_refuse_it(
    client: httpx.AsyncClient,
) -> None:
    priced = await client.post(
        "/admin/models",
        json={
            "id": "priced-mock",
            "name": "Priced mock",
            "provider": "mock",
            "provider_model": "mock",
            "input_price_per_million": "100",
            "output_price_per_million": "100",
        },
    )
    assert priced.status_code == 201, priced.text
    budget = await client.post("/admin/budgets", json={"name": "b", "hard_limit_micros": 10**9})
    assert budget.status_code == 201, budget.text
    response = await client.post("/v1/chat/completions", json=chat("priced-mock", max_tokens=HUGE))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "max_tokens"


# ---- text UTF-8 cannot encode, numbers past a double -------------------------------------------

LONE = "x\ud800y"  # json.dumps writes it as the escape `\ud800`, which JSON allows unpaired
PATHS = ["direct", "stream", "async"]


async def post_chat(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> httpx.Response:
    """`body` sent as Python's json writes it (escapes, NaN, Infinity) on one of the chat paths."""
    if path == "stream":
        body = {**body, "stream": True}
    url = "/v1/chat/completions" + ("?async=true" if path == "async" else "")
    raw = json.dumps(body)
    return await client.post(url, content=raw, headers={"content-type": "application/json"})


def refused_naming(response: httpx.Response, param: str) -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    message: str = error["message"]
    return message


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (chat("mock", LONE), "messages.0.content"),
        (
            {
                "model": "mock",
                "messages": [{"role": "user", "content": [{"type": "text", "text": LONE}]}],
            },
            "messages.0.content.0.text",
        ),
        (chat("mock", name=LONE), "name"),
        (chat("mock", user=LONE), "user"),
        (chat("mock", stop=["ok", LONE]), "stop.1"),
        (chat("mock", metadata={LONE: "v"}), "metadata.x\\ud800y"),
        (chat("mock", some_vendor_option={"deep": [LONE]}), "some_vendor_option.deep.0"),
        (
            {
                "model": "mock",
                "messages": [{"role": "user", "prompt_id": "greeting", "variables": {"who": LONE}}],
            },
            "messages.0.variables.who",
        ),
    ],
)
@pytest.mark.parametrize("path", PATHS)
async def test_a_lone_surrogate_is_a_400_naming_the_field_on_every_chat_path(
    client: httpx.AsyncClient, body: dict[str, Any], param: str, path: str
) -> None:
    message = refused_naming(await post_chat(client, path, body), param)
    # A length-limited string (`user`) is refused by pydantic itself, in its own words.
    assert "surrogate" in message or "unicode string" in message


@pytest.mark.parametrize("path", PATHS)
async def test_a_surrogate_pair_is_text_like_any_other(
    client: httpx.AsyncClient, path: str
) -> None:
    # json.dumps writes the emoji as the pair of escapes `\ud83d\ude00`.
    response = await post_chat(client, path, chat("mock", "smile \U0001f600"))
    assert response.status_code in (200, 202), response.text
    if path == "direct":
        assert "\U0001f600" in response.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_p": -math.inf}, "top_p"),
        ({"presence_penalty": math.nan}, "presence_penalty"),
        ({"frequency_penalty": math.inf}, "frequency_penalty"),
        ({"logit_bias": {"42": math.inf}}, "logit_bias.42"),
        ({"max_tokens": math.inf}, "max_tokens"),
        ({"seed": math.nan}, "seed"),
        ({"some_vendor_option": math.inf}, "some_vendor_option"),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"maximum": -math.inf}},
                    }
                ]
            },
            "tools.0.function.parameters.maximum",
        ),
    ],
)
@pytest.mark.parametrize("path", PATHS)
async def test_infinity_and_nan_are_a_400_naming_the_field_on_every_chat_path(
    client: httpx.AsyncClient, extra: dict[str, Any], param: str, path: str
) -> None:
    # Python's json writes them as `Infinity` and `NaN`; `1e309` is read as infinity too.
    refused_naming(await post_chat(client, path, chat("mock", **extra)), param)


@pytest.mark.parametrize("path", PATHS)
async def test_1e309_is_infinity_and_a_400(client: httpx.AsyncClient, path: str) -> None:
    url = "/v1/chat/completions" + ("?async=true" if path == "async" else "")
    stream = ', "stream": true' if path == "stream" else ""
    for field in ("temperature", "some_vendor_option"):
        raw = (
            '{"model": "mock", "messages": [{"role": "user", "content": "hi"}], '
            f'"{field}": 1e309{stream}}}'
        )
        response = await client.post(url, content=raw, headers={"content-type": "application/json"})
        refused_naming(response, field)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"temperature": 2.01}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"presence_penalty": -2.5}, "presence_penalty"),
        ({"frequency_penalty": 3}, "frequency_penalty"),
        ({"n": 129}, "n"),
        ({"n": 0}, "n"),
        ({"max_tokens": MAX_TOKENS + 1}, "max_tokens"),
        ({"max_completion_tokens": MAX_TOKENS + 1}, "max_completion_tokens"),
        ({"logit_bias": {"1": 101}}, "logit_bias.1"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"seed": INT64_MAX + 1}, "seed"),
    ],
)
@pytest.mark.parametrize("path", PATHS)
async def test_numbers_outside_openais_ranges_are_a_400_naming_the_field(
    client: httpx.AsyncClient, extra: dict[str, Any], param: str, path: str
) -> None:
    refused_naming(await post_chat(client, path, chat("mock", **extra)), param)


@pytest.mark.parametrize("path", PATHS)
async def test_the_range_limits_themselves_are_accepted(
    client: httpx.AsyncClient, path: str
) -> None:
    extra = {
        "temperature": 2,
        "top_p": 0,
        "presence_penalty": -2,
        "frequency_penalty": 2,
        "n": 1,
        "max_tokens": MAX_TOKENS,
        "logit_bias": {"1": -100, "2": 100},
        "logprobs": True,
        "top_logprobs": 20,
        "seed": INT64_MAX,
    }
    response = await post_chat(client, path, chat("mock", **extra))
    assert response.status_code in (200, 202), response.text


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"input": LONE}, "input", "surrogate"),
        ({"input": ["ok", LONE]}, "input.1", "surrogate"),
        ({"input": "hi", "user": LONE}, "user", "valid string"),
        ({"input": ""}, "input", "empty"),
        ({"input": []}, "input", "empty"),
        ({"input": ["ok", ""]}, "input.1", "empty"),
    ],
)
async def test_embeddings_refuse_unencodable_or_empty_input_naming_the_field(
    client: httpx.AsyncClient, body: dict[str, Any], param: str, says: str
) -> None:
    raw = json.dumps({"model": "mock-embedding", **body})
    response = await client.post(
        "/v1/embeddings", content=raw, headers={"content-type": "application/json"}
    )
    assert says in refused_naming(response, param)


async def test_embeddings_still_embed_a_string_and_a_list(client: httpx.AsyncClient) -> None:
    for given in ("one \U0001f600", ["one", "two"]):
        response = await client.post(
            "/v1/embeddings", json={"model": "mock-embedding", "input": given}
        )
        assert response.status_code == 200, response.text


async def test_batch_lines_that_cannot_be_encoded_are_refused_naming_the_field(
    storage: Storage,
) -> None:
    def line(custom_id: str, **body: Any) -> dict[str, Any]:
        return {
            "custom_id": custom_id,
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": body,
        }

    lines = [
        line("surrogate", model="mock", messages=[{"role": "user", "content": LONE}]),
        line("infinite", **chat("mock", temperature=math.inf)),
        line("vendor", **chat("mock", some_vendor_option=math.nan)),
        line(LONE, **chat("mock")),
    ]
    content = "".join(json.dumps(r) + "\n" for r in lines).encode()
    app = create_app(gateway_settings(), storage=storage, queue=RecordingQueue(storage))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://gateway",
            headers={"Authorization": f"Bearer {ADMIN}"},
        ) as http,
    ):
        uploaded = await http.post(
            "/v1/files",
            files={"file": ("requests.jsonl", content)},
            data={"purpose": "batch"},
        )
        assert uploaded.status_code == 200, uploaded.text
        created = await http.post(
            "/v1/batches",
            json={
                "input_file_id": uploaded.json()["id"],
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
            },
        )
        assert created.status_code == 200, created.text
        batch = created.json()
        # Every line is refused before running, so the batch is done at once.
        assert batch["status"] == "completed" and batch["request_counts"]["failed"] == 4
        errors = await http.get(f"/v1/files/{batch['error_file_id']}/content")
        assert errors.status_code == 200, errors.text
    refused = [json.loads(raw)["error"] for raw in errors.text.splitlines()]
    assert [(e["code"], e["param"]) for e in refused] == [
        ("invalid_body", "body.messages.0.content"),
        ("invalid_body", "body.temperature"),
        ("invalid_body", "body.some_vendor_option"),
        ("invalid_custom_id", "custom_id"),
    ]
    assert "surrogate" in refused[0]["message"]

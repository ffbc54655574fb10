"""Input that JSON allows but nothing downstream can hold (integers past 64 bits, numbers
past a double, lone UTF-16 surrogates, control characters in a model name): refused with a 400
naming the field on every path (direct, streamed, as a job, as a batch line, embeddings), never
a 500 later on."""

from __future__ import annotations

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
from app.gateway.schemas import ChatCompletionRequest
from tests.gateway.conftest import chat

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

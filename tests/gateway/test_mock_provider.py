"""The mock provider answers tools with a tool call and `response_format` with JSON, through the
API and the official SDK, streamed or not, so tool loops and structured output run offline."""

from __future__ import annotations

import json
import math
from typing import Any, Literal

import httpx
import jsonschema_rs
import openai
import pytest
from pydantic import BaseModel

from app.services import Services
from app.usage.entities import UsageRecord
from tests.gateway.conftest import chat

WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The forecast for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "default": 3},
                "when": {"type": "string", "format": "date"},
                "options": {
                    "type": "object",
                    "properties": {
                        "hourly": {"type": "boolean"},
                        "fields": {"type": "array", "items": {"type": "string"}, "minItems": 2},
                    },
                    "required": ["hourly", "fields"],
                },
            },
            "required": ["city", "unit", "days", "options"],
            "additionalProperties": False,
        },
    },
}
SEARCH: Any = {
    "type": "function",
    "function": {
        "name": "search",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string", "minLength": 3}},
            "required": ["query"],
        },
    },
}
INVOICE: Any = {
    "type": "object",
    "$defs": {"line": {"type": "object", "properties": {"sku": {"type": "string"}}}},
    "properties": {
        "number": {"type": "string", "pattern": "^[a-z]+$"},
        "issued": {"type": "string", "format": "date-time"},
        "total": {"type": "number", "exclusiveMinimum": 0},
        "status": {"enum": ["draft", "sent"]},
        "lines": {"type": "array", "items": {"$ref": "#/$defs/line"}, "minItems": 2},
        "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
    },
    "required": ["number", "issued", "total", "status", "lines", "note"],
    "additionalProperties": False,
}
USER: Any = [{"role": "user", "content": "What is the weather in Paris?"}]


def fits(schema: Any, value: Any) -> bool:
    return bool(jsonschema_rs.validator_for(schema, validate_formats=True).is_valid(value))


async def test_the_sdk_gets_a_tool_call_whose_arguments_fit_the_tools_schema(
    sdk: openai.AsyncOpenAI,
) -> None:
    completion = await sdk.chat.completions.create(model="mock", messages=USER, tools=[WEATHER])
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls is not None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    assert fits(WEATHER["function"]["parameters"], arguments)
    assert arguments["unit"] == "celsius" and arguments["days"] == 3  # first enum, the default
    assert completion.usage is not None
    assert completion.usage.completion_tokens == math.ceil(len(call.function.arguments) / 4)


@pytest.mark.parametrize(
    ("tool_choice", "called"),
    [
        (None, "get_weather"),
        ("auto", "get_weather"),
        ("required", "get_weather"),
        ({"type": "function", "function": {"name": "search"}}, "search"),
        ("none", None),
    ],
)
async def test_tool_choice_decides_which_function_is_called(
    client: httpx.AsyncClient, tool_choice: Any, called: str | None
) -> None:
    body = chat("mock", tools=[WEATHER, SEARCH])
    if tool_choice is not None:
        body["tool_choice"] = tool_choice
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    (choice,) = response.json()["choices"]
    if called is None:
        assert choice["finish_reason"] == "stop" and "tool_calls" not in choice["message"]
        assert choice["message"]["content"] == "Mock reply to: hello world"
        return
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == called
    tool = WEATHER if called == "get_weather" else SEARCH
    assert fits(tool["function"]["parameters"], json.loads(call["function"]["arguments"]))


async def test_an_unknown_function_in_tool_choice_is_a_400_naming_tool_choice(
    sdk: openai.AsyncOpenAI,
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        await sdk.chat.completions.create(
            model="mock",
            messages=USER,
            tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "book_flight"}},
        )
    assert refused.value.param == "tool_choice"  # type: ignore[attr-defined]
    assert "book_flight" in refused.value.message


async def test_a_tool_loop_ends_with_an_answer_to_the_tool_result(
    sdk: openai.AsyncOpenAI,
) -> None:
    messages: Any = list(USER)
    first = await sdk.chat.completions.create(model="mock", messages=messages, tools=[WEATHER])
    asked = first.choices[0].message
    assert asked.tool_calls is not None
    messages.append(asked.model_dump(exclude_none=True))
    messages.append(
        {"role": "tool", "tool_call_id": asked.tool_calls[0].id, "content": "18 degrees, sunny"}
    )
    second = await sdk.chat.completions.create(model="mock", messages=messages, tools=[WEATHER])
    answer = second.choices[0]
    assert answer.finish_reason == "stop" and answer.message.tool_calls is None
    assert answer.message.content == "Mock reply to the tool result: 18 degrees, sunny"


async def test_a_streamed_tool_call_comes_in_openai_deltas(
    sdk: openai.AsyncOpenAI, client: httpx.AsyncClient
) -> None:
    stream = await sdk.chat.completions.create(
        model="mock",
        messages=USER,
        tools=[WEATHER],
        stream=True,
        stream_options={"include_usage": True},
    )
    deltas, finishes, usage = [], [], None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            deltas.extend(choice.delta.tool_calls or [])
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
    opening = deltas[0]
    assert opening.index == 0 and opening.type == "function" and opening.id
    assert opening.function is not None and opening.function.name == "get_weather"
    assert all(d.index == 0 and d.id is None for d in deltas[1:])
    arguments = "".join((d.function.arguments or "") for d in deltas if d.function)
    assert fits(WEATHER["function"]["parameters"], json.loads(arguments))
    assert finishes == ["tool_calls"]
    assert usage is not None and usage.completion_tokens == len(deltas) - 1
    body = chat("mock", tools=[WEATHER], stream=True)
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        events = [line async for line in response.aiter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "tool_calls"


async def test_a_json_schema_answer_parses_and_validates(sdk: openai.AsyncOpenAI) -> None:
    completion = await sdk.chat.completions.create(
        model="mock",
        messages=USER,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "invoice", "schema": INVOICE, "strict": True},
        },
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop" and choice.message.content is not None
    assert fits(INVOICE, json.loads(choice.message.content))


async def test_a_json_object_answer_is_a_json_object(sdk: openai.AsyncOpenAI) -> None:
    completion = await sdk.chat.completions.create(
        model="mock", messages=USER, response_format={"type": "json_object"}
    )
    content = completion.choices[0].message.content
    assert content is not None
    assert json.loads(content) == {"reply": "Mock reply to: What is the weather in Paris?"}


class Forecast(BaseModel):
    city: str
    temperature: float
    unit: Literal["celsius", "fahrenheit"]
    warnings: list[str]


async def test_the_sdks_parse_helper_gets_its_model_back(sdk: openai.AsyncOpenAI) -> None:
    completion = await sdk.chat.completions.parse(
        model="mock", messages=USER, response_format=Forecast
    )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Forecast) and parsed.unit == "celsius"


async def test_a_streamed_json_answer_joins_into_valid_json(client: httpx.AsyncClient) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "i", "schema": INVOICE}}
    body = chat("mock", stream=True, response_format=response_format)
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        events = [line[6:] async for line in response.aiter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert fits(INVOICE, json.loads(content))
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_structured_answers_are_metered_with_their_usage(
    client: httpx.AsyncClient, services: Services
) -> None:
    usages = []
    invoice = {"type": "json_schema", "json_schema": {"name": "i", "schema": INVOICE}}
    for extra in ({"tools": [WEATHER]}, {"response_format": invoice}):
        response = await client.post("/v1/chat/completions", json=chat("mock", **extra))
        assert response.status_code == 200, response.text
        usages.append(response.json()["usage"])
    assert all(u["completion_tokens"] > 1 for u in usages)
    async with services.storage.unit_of_work() as uow:
        records = (await uow.repo(UsageRecord).find(order_by=["created_at"])).items
    recorded = [(r.input_tokens, r.output_tokens) for r in records]
    assert recorded == [(u["prompt_tokens"], u["completion_tokens"]) for u in usages]


async def test_mock_replies_answer_by_what_the_last_user_message_contains() -> None:
    from app.credentials.entities import Provider
    from app.gateway.providers.base import Upstream
    from app.gateway.providers.mock import MockProvider

    upstream = Upstream(
        "judge",
        Provider.MOCK,
        "mock",
        parameters={"mock_replies": {"penguin": "0.9", "walrus": "0.4"}, "mock_reply": "none"},
    )

    async def reply(text: str) -> str:
        body = await MockProvider().chat(
            upstream, {"messages": [{"role": "user", "content": text}]}
        )
        return str(body["choices"][0]["message"]["content"])

    assert await reply("about a penguin and a walrus") == "0.9"  # the first key found wins
    assert await reply("a walrus") == "0.4"
    assert await reply("a zebra") == "none"

"""Anthropic Messages: OpenAI chat requests translated there, and answers and events back."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import orjson

from app.core.errors import InvalidInput
from app.gateway.providers.base import (
    JSON,
    Embeddings,
    Upstream,
    content_text,
    no_embeddings,
    upstream_error,
)
from app.gateway.providers.http import HttpPool, open_stream, post_json, sse_events

ANTHROPIC_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096

STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
# Anthropic's error types for failures reported inside a stream, as HTTP statuses.
ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "rate_limit_error": 429,
    "overloaded_error": 529,
}


def _image(part: JSON) -> JSON:
    url = str((part.get("image_url") or {}).get("url", ""))
    if url.startswith("data:") and ";base64," in url:
        media_type, _, data = url[5:].partition(";base64,")
        return {
            "type": "image",
            "source": {"type": "base64", "media_type": media_type, "data": data},
        }
    return {"type": "image", "source": {"type": "url", "url": url}}


def _blocks(content: Any) -> list[JSON]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks: list[JSON] = []
    for part in content or []:
        if part.get("type") == "text":
            blocks.append({"type": "text", "text": str(part.get("text", ""))})
        elif part.get("type") == "image_url":
            blocks.append(_image(part))
    return blocks


def _arguments(raw: Any) -> Any:
    if isinstance(raw, str):
        try:
            return orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            return {"arguments": raw}
    return raw or {}


def translate_messages(messages: list[JSON]) -> tuple[str | None, list[JSON]]:
    """The system text, and alternating user/assistant messages made of content blocks."""
    system: list[str] = []
    out: list[JSON] = []
    for message in messages:
        role = message.get("role")
        if role in ("system", "developer"):
            system.append(content_text(message.get("content")))
            continue
        blocks: list[JSON]
        if role in ("tool", "function"):
            role, blocks = (
                "user",
                [
                    {
                        "type": "tool_result",
                        "tool_use_id": str(
                            message.get("tool_call_id") or message.get("name") or ""
                        ),
                        "content": content_text(message.get("content")),
                    }
                ],
            )
        elif role == "assistant":
            blocks = _blocks(message.get("content"))
            for call in message.get("tool_calls") or []:
                function = call.get("function") or {}
                blocks.append(
                    {
                        "type": "tool_use",
                        "id": call.get("id"),
                        "name": function.get("name"),
                        "input": _arguments(function.get("arguments")),
                    }
                )
        else:
            role, blocks = "user", _blocks(message.get("content"))
        # Anthropic wants roles to alternate: consecutive messages of one role become one.
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})
    return ("\n\n".join(s for s in system if s) or None), out


def _tool_choice(choice: Any, parallel: bool | None) -> JSON | None:
    result: JSON | None
    if choice is None:
        result = None if parallel is None else {"type": "auto"}
    elif choice == "auto":
        result = {"type": "auto"}
    elif choice == "required":
        result = {"type": "any"}
    elif choice == "none":
        return {"type": "none"}
    else:
        result = {"type": "tool", "name": choice["function"]["name"]}
    if result is not None and parallel is False:
        result["disable_parallel_tool_use"] = True
    return result


def translate_request(upstream: Upstream, body: JSON) -> JSON:
    """An Anthropic Messages request for an OpenAI chat request."""
    if (body.get("n") or 1) > 1:
        raise InvalidInput(
            "this model's provider (anthropic) returns one choice: set n to 1", param="n"
        )
    system, messages = translate_messages(body.get("messages") or [])
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    payload: JSON = {
        "model": upstream.provider_model,
        "messages": messages,
        "max_tokens": max_tokens or upstream.parameters.get("max_tokens") or DEFAULT_MAX_TOKENS,
    }
    if system:
        payload["system"] = system
    if body.get("temperature") is not None:
        # OpenAI's range is 0 to 2, Anthropic's 0 to 1.
        payload["temperature"] = min(float(body["temperature"]), 1.0)
    if body.get("top_p") is not None:
        payload["top_p"] = body["top_p"]
    stop = body.get("stop")
    if stop:
        payload["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if body.get("user"):
        payload["metadata"] = {"user_id": body["user"]}
    tools = body.get("tools")
    if tools:
        payload["tools"] = [
            {
                "name": t["function"]["name"],
                "description": t["function"].get("description") or "",
                "input_schema": t["function"].get("parameters") or {"type": "object"},
            }
            for t in tools
        ]
    choice = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
    if choice is not None and tools:
        payload["tool_choice"] = choice
    return payload


def _usage(usage: JSON) -> JSON:
    prompt = (
        int(usage.get("input_tokens") or 0)
        + int(usage.get("cache_creation_input_tokens") or 0)
        + int(usage.get("cache_read_input_tokens") or 0)
    )
    completion = int(usage.get("output_tokens") or 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def translate_response(message: JSON) -> JSON:
    """An OpenAI `chat.completion` for an Anthropic message."""
    text: list[str] = []
    tool_calls: list[JSON] = []
    for block in message.get("content") or []:
        if block.get("type") == "text":
            text.append(str(block.get("text", "")))
        elif block.get("type") == "tool_use":
            tool_calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {
                        "name": block.get("name"),
                        "arguments": orjson.dumps(block.get("input") or {}).decode(),
                    },
                }
            )
    reply: JSON = {
        "role": "assistant",
        "content": "".join(text) if text or not tool_calls else None,
    }
    if tool_calls:
        reply["tool_calls"] = tool_calls
    return {
        "id": f"chatcmpl-{message.get('id', '')}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": message.get("model"),
        "choices": [
            {
                "index": 0,
                "message": reply,
                "finish_reason": STOP_REASONS.get(str(message.get("stop_reason")), "stop"),
                "logprobs": None,
            }
        ],
        "usage": _usage(message.get("usage") or {}),
    }


class AnthropicProvider:
    """Anthropic's Messages API behind the OpenAI chat interface."""

    default_base_url = "https://api.anthropic.com"

    def __init__(self, pool: HttpPool) -> None:
        self._pool = pool

    def _url(self, upstream: Upstream) -> str:
        return (upstream.base_url or self.default_base_url).rstrip("/") + "/v1/messages"

    def _headers(self, upstream: Upstream) -> dict[str, str]:
        version = upstream.api_version or ANTHROPIC_VERSION
        return upstream.json_headers("x-api-key", "{secret}", **{"anthropic-version": version})

    async def chat(self, upstream: Upstream, body: JSON) -> JSON:
        payload = translate_request(upstream, body)
        answer = await post_json(
            self._pool, upstream, self._url(upstream), self._headers(upstream), payload
        )
        return translate_response(answer)

    async def stream(self, upstream: Upstream, body: JSON) -> AsyncIterator[JSON]:
        payload = {**translate_request(upstream, body), "stream": True}
        chunk_id, created, model = "chatcmpl-", int(time.time()), upstream.provider_model
        usage: JSON = {}
        tool_index: dict[int, int] = {}

        def chunk(delta: JSON, finish: str | None = None) -> JSON:
            return {
                "id": chunk_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }

        async with open_stream(
            self._pool, upstream, self._url(upstream), self._headers(upstream), payload
        ) as response:
            async for event, data in sse_events(response):
                item: Any = orjson.loads(data)
                kind = event or item.get("type")
                if kind == "message_start":
                    message = item.get("message") or {}
                    chunk_id = f"chatcmpl-{message.get('id', '')}"
                    model = message.get("model") or model
                    usage.update(message.get("usage") or {})
                    yield chunk({"role": "assistant", "content": ""})
                elif kind == "content_block_start":
                    block = item.get("content_block") or {}
                    if block.get("type") == "tool_use":
                        index = tool_index.setdefault(item.get("index", 0), len(tool_index))
                        call = {
                            "index": index,
                            "id": block.get("id"),
                            "type": "function",
                            "function": {"name": block.get("name"), "arguments": ""},
                        }
                        yield chunk({"tool_calls": [call]})
                elif kind == "content_block_delta":
                    delta = item.get("delta") or {}
                    if delta.get("type") == "text_delta":
                        yield chunk({"content": delta.get("text", "")})
                    elif delta.get("type") == "input_json_delta":
                        index = tool_index.get(item.get("index", 0), 0)
                        arguments = {"arguments": delta.get("partial_json", "")}
                        yield chunk({"tool_calls": [{"index": index, "function": arguments}]})
                elif kind == "message_delta":
                    usage.update(item.get("usage") or {})
                    reason = (item.get("delta") or {}).get("stop_reason")
                    yield chunk({}, STOP_REASONS.get(str(reason), "stop"))
                elif kind == "message_stop":
                    yield {**chunk({}), "choices": [], "usage": _usage(usage)}
                    return
                elif kind == "error":
                    error = item.get("error") or {}
                    status = ERROR_STATUS.get(str(error.get("type")), 502)
                    raise upstream_error(upstream, status, data)

    async def embed(
        self, upstream: Upstream, inputs: list[str], dimensions: int | None
    ) -> Embeddings:
        raise no_embeddings(upstream)

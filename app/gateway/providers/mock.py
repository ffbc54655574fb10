"""The built-in mock provider: deterministic replies and embeddings, configurable behaviour.

It answers as an OpenAI model would in shape: with `tools` it calls one (arguments generated
from its `parameters` schema), with `response_format` it answers JSON (fitting the schema of
`json_schema`), streamed or not; so tool loops and structured output can be tested offline.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from app.core.errors import (
    InvalidInput,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from app.gateway.providers.base import JSON, Embeddings, Upstream, content_text
from app.gateway.providers.json_sample import SchemaError, sample

DEFAULT_DIMENSIONS = 256
_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class MockBehaviour:
    """How the mock answers; a model's `mock_*` parameters override the process defaults."""

    latency_ms: float = 0.0
    failure_rate: float = 0.0
    failure: str = "transient"  # "permanent", "timeout" or "rate_limit"
    word_delay_ms: float = 0.0
    reply: str | None = None
    # Replies by what the last user message contains: the first key found in it wins.
    replies: tuple[tuple[str, str], ...] = ()
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    dimensions: int = DEFAULT_DIMENSIONS

    @classmethod
    def from_parameters(cls, parameters: dict[str, Any], default: MockBehaviour) -> MockBehaviour:
        def number(name: str) -> int | None:
            value = parameters.get(name)
            return None if value is None else int(value)

        return cls(
            latency_ms=float(parameters.get("mock_latency_ms", default.latency_ms)),
            failure_rate=float(parameters.get("mock_failure_rate", default.failure_rate)),
            failure=str(parameters.get("mock_failure", default.failure)),
            word_delay_ms=float(parameters.get("mock_word_delay_ms", default.word_delay_ms)),
            reply=parameters.get("mock_reply", default.reply),
            replies=tuple(
                (str(k), str(v)) for k, v in (parameters.get("mock_replies") or {}).items()
            )
            or default.replies,
            completion_tokens=number("mock_completion_tokens") or default.completion_tokens,
            prompt_tokens=number("mock_prompt_tokens") or default.prompt_tokens,
            dimensions=int(parameters.get("mock_dimensions", default.dimensions)),
        )


def _count(text: str) -> int:
    return max(1, len(text.split()))


@dataclass
class _Reply:
    """What the mock answers: text or JSON in pieces (a token each), or one tool call whose
    arguments are the pieces."""

    head: JSON  # id, created, model, usage
    pieces: list[str] = field(default_factory=list)
    finish: str = "stop"
    tool_call: JSON | None = None


def _pieces(text: str) -> list[str]:
    """Structured text as tokens of about four characters, as a tokenizer would cut it."""
    return [text[i : i + 4] for i in range(0, len(text), 4)] or [""]


def _chosen_tool(body: JSON, messages: list[JSON]) -> tuple[int, JSON] | None:
    """The position and function of the tool to call, or None for an answer in words.

    Any `tool_choice` but "none" calls one (the named one, else the first), except when the
    last message is a tool's result: that is answered, so a tool loop ends.
    """
    tools = body.get("tools") or []
    choice = body.get("tool_choice")
    if not tools or choice == "none":
        return None
    if messages and messages[-1].get("role") in ("tool", "function"):
        return None
    functions = [tool.get("function") or {} for tool in tools]
    if not isinstance(choice, dict):
        return 0, functions[0]
    name = (choice.get("function") or {}).get("name")
    for index, function in enumerate(functions):
        if function.get("name") == name:
            return index, function
    raise InvalidInput(
        f"tool_choice names the function '{name}', which is not among the tools",
        param="tool_choice",
    )


def _sampled(schema: Any, param: str) -> Any:
    try:
        return sample(schema)
    except SchemaError as exc:
        raise InvalidInput(f"{param}: {exc}", param=param) from exc


def _content(body: JSON, messages: list[JSON], behaviour: MockBehaviour) -> tuple[list[str], str]:
    """The answer's pieces and finish reason: words answering the last user message (or the
    tool result that ends the conversation), or JSON when `response_format` asks for it; cut at
    `max_tokens`, with finish reason `length`."""
    last = messages[-1] if messages else {}
    if last.get("role") in ("tool", "function"):
        text = f"Mock reply to the tool result: {content_text(last.get('content'), ' ')[:200]}"
        text = behaviour.reply or text
    else:
        last_user = next(
            (
                content_text(m.get("content"), " ")
                for m in reversed(messages)
                if m.get("role") == "user"
            ),
            "",
        )
        text = f"Mock reply to: {last_user[:200]}" if last_user else "Mock reply."
        chosen = next((r for needle, r in behaviour.replies if needle in last_user), None)
        text = chosen or behaviour.reply or text
    response_format = body.get("response_format") or {}
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    schema = (response_format.get("json_schema") or {}).get("schema") if kind else None
    if kind == "json_schema" and schema is not None:
        value = _sampled(schema, "response_format.json_schema.schema")
        pieces = _pieces(orjson.dumps(value).decode())
    elif kind in ("json_object", "json_schema"):
        pieces = _pieces(orjson.dumps({"reply": text}).decode())
    else:
        words = text.split() or ["Mock"]
        if behaviour.completion_tokens is not None:
            words = [words[i % len(words)] for i in range(behaviour.completion_tokens)]
        pieces = [word if i == 0 else " " + word for i, word in enumerate(words)]
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if limit is not None and len(pieces) > limit:
        return pieces[:limit], "length"
    return pieces, "stop"


def embed_text(text: str, dimensions: int) -> list[float]:
    """A hashed bag of words, L2-normalised: equal texts, equal vectors; shared words overlap."""
    vector = [0.0] * dimensions
    for word in _WORD.findall(text.lower()):
        digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
        slot = int.from_bytes(digest[:4], "little") % dimensions
        vector[slot] += 1.0 if digest[4] & 1 else -1.0
    norm = math.sqrt(sum(v * v for v in vector))
    return [v / norm for v in vector] if norm else vector


class MockProvider:
    """Answers every chat request with a reply derived from its last user message, a tool
    call, or JSON, as the request asks."""

    def __init__(self, defaults: MockBehaviour | None = None) -> None:
        self.defaults = defaults or MockBehaviour()

    def behaviour(self, upstream: Upstream) -> MockBehaviour:
        return MockBehaviour.from_parameters(upstream.parameters, self.defaults)

    async def _act(self, upstream: Upstream, behaviour: MockBehaviour) -> None:
        if behaviour.latency_ms > 0:
            await asyncio.sleep(behaviour.latency_ms / 1000)
        if behaviour.failure_rate > 0 and random.random() < behaviour.failure_rate:
            name = f"mock model '{upstream.model_id}'"
            if behaviour.failure == "permanent":
                raise InvalidInput(f"{name} refused the request (simulated 400)")
            if behaviour.failure == "timeout":
                raise UpstreamTimeout(f"{name} did not answer in time (simulated)")
            if behaviour.failure == "rate_limit":
                raise UpstreamRateLimited(f"{name} is rate limited (simulated 429)")
            raise UpstreamUnavailable(f"{name} is unavailable (simulated 503)")

    def _answer(self, upstream: Upstream, body: JSON, behaviour: MockBehaviour) -> _Reply:
        messages = body.get("messages") or []
        prompt = " ".join(content_text(m.get("content"), " ") for m in messages)
        digest = hashlib.sha256(f"{upstream.model_id}\n{prompt}".encode()).hexdigest()[:24]
        prompt_tokens = behaviour.prompt_tokens or _count(prompt)
        reply = _Reply(head={"id": f"chatcmpl-{digest}", "created": int(time.time())})
        chosen = _chosen_tool(body, messages)
        if chosen is not None:
            index, function = chosen
            parameters = function.get("parameters") or {"type": "object"}
            arguments = orjson.dumps(
                _sampled(parameters, f"tools.{index}.function.parameters")
            ).decode()
            reply.tool_call = {
                "id": f"call_{digest}",
                "type": "function",
                "function": {"name": function["name"], "arguments": arguments},
            }
            reply.pieces, reply.finish = _pieces(arguments), "tool_calls"
        else:
            reply.pieces, reply.finish = _content(body, messages, behaviour)
        completion_tokens = len(reply.pieces)
        reply.head["model"] = upstream.model_id
        reply.head["usage"] = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        return reply

    async def chat(self, upstream: Upstream, body: JSON) -> JSON:
        behaviour = self.behaviour(upstream)
        await self._act(upstream, behaviour)
        reply = self._answer(upstream, body, behaviour)
        message: JSON = {"role": "assistant", "content": "".join(reply.pieces)}
        if reply.tool_call is not None:
            message = {"role": "assistant", "content": None, "tool_calls": [reply.tool_call]}
        choices = [
            {
                "index": i,
                "message": dict(message),
                "finish_reason": reply.finish,
                "logprobs": None,
            }
            for i in range(body.get("n") or 1)
        ]
        return {
            "id": reply.head["id"],
            "object": "chat.completion",
            "created": reply.head["created"],
            "model": reply.head["model"],
            "choices": choices,
            "usage": reply.head["usage"],
        }

    async def stream(self, upstream: Upstream, body: JSON) -> AsyncIterator[JSON]:
        behaviour = self.behaviour(upstream)
        await self._act(upstream, behaviour)
        reply = self._answer(upstream, body, behaviour)
        head = reply.head
        base = {
            "id": head["id"],
            "object": "chat.completion.chunk",
            "created": head["created"],
            "model": head["model"],
        }

        def chunk(delta: JSON, finish_reason: str | None = None) -> JSON:
            return {
                **base,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
            }

        call = reply.tool_call
        if call is None:
            yield chunk({"role": "assistant", "content": ""})
        else:
            # OpenAI's shape: the call's id and name first, then its arguments in fragments.
            opening = {**call, "function": {"name": call["function"]["name"], "arguments": ""}}
            yield chunk(
                {"role": "assistant", "content": None, "tool_calls": [{"index": 0, **opening}]}
            )
        for piece in reply.pieces:
            if behaviour.word_delay_ms > 0:
                await asyncio.sleep(behaviour.word_delay_ms / 1000)
            if call is None:
                yield chunk({"content": piece})
            else:
                yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
        yield chunk({}, reply.finish)
        yield {**base, "choices": [], "usage": head["usage"]}

    async def embed(
        self, upstream: Upstream, inputs: list[str], dimensions: int | None
    ) -> Embeddings:
        behaviour = self.behaviour(upstream)
        await self._act(upstream, behaviour)
        size = dimensions or behaviour.dimensions
        return Embeddings(
            vectors=[embed_text(text, size) for text in inputs],
            prompt_tokens=sum(_count(text) for text in inputs),
        )

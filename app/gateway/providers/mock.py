"""The built-in mock provider: deterministic replies and embeddings, configurable behaviour."""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from app.core.errors import (
    InvalidInput,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from app.gateway.providers.base import JSON, Embeddings, Upstream

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
            completion_tokens=number("mock_completion_tokens") or default.completion_tokens,
            prompt_tokens=number("mock_prompt_tokens") or default.prompt_tokens,
            dimensions=int(parameters.get("mock_dimensions", default.dimensions)),
        )


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if p.get("type") == "text")
    return ""


def _count(text: str) -> int:
    return max(1, len(text.split()))


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
    """Answers every chat request with a reply derived from its last user message."""

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

    def _answer(
        self, upstream: Upstream, body: JSON, behaviour: MockBehaviour
    ) -> tuple[JSON, list[str], str]:
        messages = body.get("messages") or []
        prompt = " ".join(_text(m.get("content")) for m in messages)
        last_user = next(
            (_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), ""
        )
        reply = behaviour.reply or (
            f"Mock reply to: {last_user[:200]}" if last_user else "Mock reply."
        )
        words = reply.split() or ["Mock"]
        if behaviour.completion_tokens is not None:
            words = [words[i % len(words)] for i in range(behaviour.completion_tokens)]
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        finish = "stop"
        if limit is not None and len(words) > limit:
            words, finish = words[:limit], "length"
        digest = hashlib.sha256(f"{upstream.model_id}\n{prompt}".encode()).hexdigest()[:24]
        prompt_tokens = behaviour.prompt_tokens or _count(prompt)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(words),
            "total_tokens": prompt_tokens + len(words),
        }
        head = {
            "id": f"chatcmpl-{digest}",
            "created": int(time.time()),
            "model": upstream.model_id,
            "usage": usage,
        }
        return head, words, finish

    async def chat(self, upstream: Upstream, body: JSON) -> JSON:
        behaviour = self.behaviour(upstream)
        await self._act(upstream, behaviour)
        head, words, finish = self._answer(upstream, body, behaviour)
        content = " ".join(words)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": content},
                "finish_reason": finish,
                "logprobs": None,
            }
            for i in range(body.get("n") or 1)
        ]
        return {
            "id": head["id"],
            "object": "chat.completion",
            "created": head["created"],
            "model": head["model"],
            "choices": choices,
            "usage": head["usage"],
        }

    async def stream(self, upstream: Upstream, body: JSON) -> AsyncIterator[JSON]:
        behaviour = self.behaviour(upstream)
        await self._act(upstream, behaviour)
        head, words, finish = self._answer(upstream, body, behaviour)
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

        yield chunk({"role": "assistant", "content": ""})
        for i, word in enumerate(words):
            if behaviour.word_delay_ms > 0:
                await asyncio.sleep(behaviour.word_delay_ms / 1000)
            yield chunk({"content": word if i == 0 else " " + word})
        yield chunk({}, finish)
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

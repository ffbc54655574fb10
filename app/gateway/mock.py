"""The built-in mock provider: deterministic replies, configurable latency and failures."""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from dataclasses import dataclass
from typing import Any

from app.core.errors import InvalidInput, Transient
from app.gateway.schemas import ChatCompletionRequest


@dataclass(frozen=True)
class MockBehaviour:
    """How the mock answers: delay, how often it fails, and whether failures are transient."""

    latency_ms: float = 0.0
    failure_rate: float = 0.0
    failure: str = "transient"  # or "permanent"

    @classmethod
    def from_parameters(cls, parameters: dict[str, Any], default: MockBehaviour) -> MockBehaviour:
        return cls(
            latency_ms=float(parameters.get("mock_latency_ms", default.latency_ms)),
            failure_rate=float(parameters.get("mock_failure_rate", default.failure_rate)),
            failure=str(parameters.get("mock_failure", default.failure)),
        )


def _tokens(text: str) -> int:
    return max(1, len(text.split()))


class MockProvider:
    """Answers every chat request with a reply derived from its last user message."""

    async def chat(
        self, request: ChatCompletionRequest, *, model_id: str, behaviour: MockBehaviour
    ) -> dict[str, Any]:
        if behaviour.latency_ms > 0:
            await asyncio.sleep(behaviour.latency_ms / 1000)
        if behaviour.failure_rate > 0 and random.random() < behaviour.failure_rate:
            if behaviour.failure == "permanent":
                raise InvalidInput("mock provider refused the request (simulated 400)")
            raise Transient("mock provider is unavailable (simulated 503)")
        prompt = " ".join(m.text() for m in request.messages)
        last_user = next((m.text() for m in reversed(request.messages) if m.role == "user"), "")
        reply = f"Mock reply to: {last_user[:200]}" if last_user else "Mock reply."
        limit = request.max_completion_tokens or request.max_tokens
        words = reply.split()
        finish = "stop"
        if limit is not None and len(words) > limit:
            words, finish = words[:limit], "length"
        content = " ".join(words)
        digest = hashlib.sha256(f"{model_id}\n{prompt}".encode()).hexdigest()[:24]
        prompt_tokens, completion_tokens = _tokens(prompt), len(words)
        return {
            "id": f"chatcmpl-{digest}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_id,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": finish,
                    "logprobs": None,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

"""OpenAI-compatible upstreams (OpenAI, vLLM, Ollama, OpenRouter…) and Azure OpenAI."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson

from app.gateway.providers.base import JSON, Embeddings, Upstream, upstream_error
from app.gateway.providers.http import HttpPool, open_stream, post_json, sse_events

DEFAULT_AZURE_API_VERSION = "2024-10-21"


class OpenAIProvider:
    """Speaks the OpenAI wire format to any base URL."""

    default_base_url = "https://api.openai.com/v1"

    def __init__(self, pool: HttpPool) -> None:
        self._pool = pool

    def url(self, upstream: Upstream, path: str) -> str:
        base = upstream.base_url or self.default_base_url
        return base.rstrip("/") + path

    def headers(self, upstream: Upstream) -> dict[str, str]:
        return upstream.json_headers("authorization", "Bearer {secret}")

    def payload(self, upstream: Upstream, body: JSON) -> JSON:
        return {**body, "model": upstream.provider_model}

    async def chat(self, upstream: Upstream, body: JSON) -> JSON:
        payload = self.payload(upstream, body)
        payload.pop("stream", None)
        payload.pop("stream_options", None)
        url = self.url(upstream, "/chat/completions")
        return await post_json(self._pool, upstream, url, self.headers(upstream), payload)

    async def stream(self, upstream: Upstream, body: JSON) -> AsyncIterator[JSON]:
        # Usage is always asked for, so the gateway can account for it even when the client
        # did not ask to see it.
        payload = {**self.payload(upstream, body), "stream": True}
        payload["stream_options"] = {"include_usage": True}
        url = self.url(upstream, "/chat/completions")
        async with open_stream(
            self._pool, upstream, url, self.headers(upstream), payload
        ) as response:
            async for _, data in sse_events(response):
                if data == b"[DONE]":
                    return
                chunk: Any = orjson.loads(data)
                if isinstance(chunk, dict) and "error" in chunk:
                    raise upstream_error(upstream, 502, data)
                yield chunk

    async def embed(
        self, upstream: Upstream, inputs: list[str], dimensions: int | None
    ) -> Embeddings:
        payload: JSON = {"input": inputs, "encoding_format": "float"}
        payload = self.payload(upstream, payload)
        if dimensions is not None:
            payload["dimensions"] = dimensions
        url = self.url(upstream, "/embeddings")
        body = await post_json(self._pool, upstream, url, self.headers(upstream), payload)
        items = sorted(body.get("data") or [], key=lambda item: item.get("index", 0))
        usage = body.get("usage") or {}
        return Embeddings(
            vectors=[list(item["embedding"]) for item in items],
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
        )


class AzureOpenAIProvider(OpenAIProvider):
    """Azure OpenAI: deployment URLs, an `api-version` query and an `api-key` header."""

    default_base_url = ""

    def url(self, upstream: Upstream, path: str) -> str:
        version = upstream.api_version or DEFAULT_AZURE_API_VERSION
        base = (upstream.base_url or "").rstrip("/")
        return f"{base}/openai/deployments/{upstream.provider_model}{path}?api-version={version}"

    def headers(self, upstream: Upstream) -> dict[str, str]:
        return upstream.json_headers("api-key", "{secret}")

    def payload(self, upstream: Upstream, body: JSON) -> JSON:
        # The deployment in the URL chooses the model.
        return {k: v for k, v in body.items() if k != "model"}

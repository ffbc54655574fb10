"""What every provider adapter implements, and the resolved upstream it is called with."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from app.core.egress import ProxyRefused
from app.core.errors import (
    DomainError,
    InvalidInput,
    Unavailable,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from app.credentials.entities import Provider

JSON = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Upstream:
    """One model at its provider: where to send, how to authenticate, and its defaults."""

    model_id: str
    provider: Provider
    provider_model: str
    base_url: str | None = None
    # Never logged or returned; `repr=False` keeps it out of tracebacks and debug output.
    secret: str | None = field(default=None, repr=False)
    api_version: str | None = None
    header_name: str | None = None
    header_value_template: str | None = None
    parameters: JSON = field(default_factory=dict)
    timeout: float = 60.0
    connect_timeout: float = 5.0
    # The model's `config_version`: cached answers of an older configuration are never reused.
    config_version: int = 1

    def json_headers(
        self, default_name: str, default_template: str, **extra: str
    ) -> dict[str, str]:
        """The headers of a JSON request (`extra` among them) with the secret in the provider's
        header (`default_name: default_template`) unless the credential names its own."""
        headers = {"content-type": "application/json", **extra}
        if self.secret is not None:
            name = self.header_name or default_name
            template = self.header_value_template or default_template
            headers[name] = template.replace("{secret}", self.secret)
        return headers

    def scrub(self, text: str) -> str:
        """`text` without the secret, for upstream messages that echo what they were sent."""
        return text.replace(self.secret, "***") if self.secret else text


def content_text(content: Any, separator: str = "") -> str:
    """The text of a message's `content`: the string, or its text parts joined by `separator`
    (images and other parts left out)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return separator.join(str(p.get("text", "")) for p in content if p.get("type") == "text")
    return ""


@dataclass(frozen=True, slots=True)
class Embeddings:
    vectors: list[list[float]]
    prompt_tokens: int


class ChatProvider(Protocol):
    """An adapter speaking one provider's wire format; requests and answers are OpenAI-shaped.

    `body` is an OpenAI chat request without `model`; answers are OpenAI `chat.completion`
    objects and `chat.completion.chunk` objects whose `model` the caller rewrites.
    """

    async def chat(self, upstream: Upstream, body: JSON) -> JSON:
        """One completion."""
        ...

    def stream(self, upstream: Upstream, body: JSON) -> AsyncIterator[JSON]:
        """The completion as chunks: role, content…, finish, and a last one carrying usage."""
        ...

    async def embed(
        self, upstream: Upstream, inputs: list[str], dimensions: int | None
    ) -> Embeddings:
        """One vector per input."""
        ...


def no_embeddings(upstream: Upstream) -> DomainError:
    return InvalidInput(
        f"model '{upstream.model_id}' uses provider '{upstream.provider}', which has no embeddings",
        param="model",
    )


def _message(payload: bytes) -> str | None:
    try:
        body = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if isinstance(body.get("message"), str):
            return str(body["message"])
    return None


def upstream_error(
    upstream: Upstream, status: int, payload: bytes, retry_after: str | None = None
) -> DomainError:
    """The domain error for an upstream's error answer (secret scrubbed from its message)."""
    detail = _message(payload)
    where = f"model '{upstream.model_id}' ({upstream.provider})"
    message = f"upstream {where} answered HTTP {status}"
    if detail:
        message += ": " + upstream.scrub(detail)[:500]
    if status == 429:
        try:
            delay = float(retry_after) if retry_after else 1.0
        except ValueError:
            delay = 1.0
        return UpstreamRateLimited(message, retry_after=delay)
    if status == 408 or status >= 500:
        return UpstreamUnavailable(message)
    if status in (401, 403):
        # The caller's key is fine; ours was refused, which they should hear as such.
        return UpstreamRejected(message, status=status, param="model")
    if status == 404:
        return UpstreamRejected(message, status=404, param="model")
    return UpstreamRejected(message, status=400 if status != 413 else 413)


def forbidden_error(upstream: Upstream, exc: DomainError) -> Unavailable:
    """A provider URL whose address the outbound policy refuses: no byte was sent to it."""
    return Unavailable(
        f"model '{upstream.model_id}' cannot be called: {exc.message} (an operator can allow "
        "a self-hosted provider with OUTBOUND_ALLOWED_HOSTS)"
    )


def redirect_error(upstream: Upstream, status: int) -> UpstreamUnavailable:
    """A 3xx answer: provider calls never follow redirects, which could lead anywhere."""
    return UpstreamUnavailable(
        f"upstream model '{upstream.model_id}' ({upstream.provider}) answered HTTP {status}, a "
        "redirect, which the gateway does not follow: configure the final URL instead"
    )


def timeout_error(upstream: Upstream) -> UpstreamTimeout:
    return UpstreamTimeout(f"upstream model '{upstream.model_id}' did not answer in time")


def connection_error(upstream: Upstream, exc: BaseException) -> UpstreamUnavailable:
    if isinstance(exc, ProxyRefused):
        # Says where and what status, never the credentials (the proxy's `str` has none).
        return UpstreamUnavailable(f"could not reach upstream model '{upstream.model_id}': {exc}")
    return UpstreamUnavailable(
        f"could not reach upstream model '{upstream.model_id}' ({type(exc).__name__})"
    )

"""Chat completions and embeddings upstream: resolve → prepare → call the providers of a route.

Each step is its own method so that the one gateway call (`app/gateway/calls.py`) can put
permissions, admission, the response cache and settlement around them.
"""

from __future__ import annotations

import base64
import os
import struct
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from app.core.errors import (
    DomainError,
    DuplicateKey,
    InvalidInput,
    NotFound,
    Unavailable,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from app.core.invalidation import ALL, ROUTES_TOPIC, InvalidationBus
from app.core.loading import LoadingCache
from app.core.outbound import OutboundPolicy
from app.credentials.entities import Provider, StoredCredential
from app.credentials.schemas import has_url_credentials
from app.gateway.providers.anthropic import AnthropicProvider
from app.gateway.providers.base import JSON, ChatProvider, Upstream
from app.gateway.providers.http import HttpPool
from app.gateway.providers.mock import MockBehaviour, MockProvider
from app.gateway.providers.openai import AzureOpenAIProvider, OpenAIProvider
from app.gateway.routing import CircuitBreakers, Route, Step, run_route
from app.gateway.schemas import ChatCompletionRequest, EmbeddingRequest
from app.models.entities import Model, ModelChain, ModelKind
from app.storage.protocol import Storage
from app.storage.reads import read_existing

# Model parameters that act as defaults of the request's own (the request wins).
SAMPLING_DEFAULTS = (
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "presence_penalty",
    "frequency_penalty",
    "stop",
    "seed",
    "response_format",
)


class RevealedSecret(Protocol):
    """What `CredentialService.reveal` returns: how to reach a provider, secret in clear."""

    @property
    def secret(self) -> str | None: ...
    @property
    def endpoint(self) -> str | None: ...
    @property
    def api_version(self) -> str | None: ...
    @property
    def header_name(self) -> str | None: ...
    @property
    def header_value_template(self) -> str | None: ...


class CredentialSource(Protocol):
    async def reveal(self, credential_id: str) -> RevealedSecret: ...


class PromptExpander(Protocol):
    async def expand_messages(self, messages: list[JSON]) -> list[JSON]: ...


@dataclass(frozen=True)
class _EnvCredential:
    provider: Provider
    secret: str | None = field(repr=False)
    endpoint: str | None
    api_version: str | None
    header_name: str | None
    header_value_template: str | None


class EnvCredentials:
    """Reads credentials whose secret lives in an environment variable (no decryption here)."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage

    async def reveal(self, credential_id: str) -> RevealedSecret:
        stored = await read_existing(self._storage, StoredCredential, credential_id, "credential")
        if stored.env_var is None and stored.secret_encrypted is not None:
            raise Unavailable(f"credential '{credential_id}' cannot be read by this process")
        return _EnvCredential(
            provider=stored.provider,
            secret=os.environ.get(stored.env_var) if stored.env_var else None,
            endpoint=stored.endpoint,
            api_version=stored.api_version,
            header_name=stored.header_name,
            header_value_template=stored.header_value_template,
        )


@dataclass(frozen=True)
class UpstreamSettings:
    timeout: float = 60.0
    connect_timeout: float = 5.0
    max_retries: int = 1
    max_connections: int = 200
    breaker_threshold: int = 5
    breaker_cooldown: float = 30.0
    route_cache_seconds: float = 2.0
    # Which addresses provider URLs may reach (OUTBOUND_ALLOWED_HOSTS; public ones only by default).
    policy: OutboundPolicy = field(default_factory=OutboundPolicy)


@dataclass
class ChatAnswer:
    """A completion (or an embeddings list), the model that produced it and its provider."""

    model_id: str
    body: JSON
    provider: str = ""

    @property
    def usage(self) -> JSON:
        usage: JSON = self.body.get("usage") or {}
        return usage


@dataclass
class ChatStream:
    """A started stream: the model that answers, and its chunks (usage is set once known)."""

    model_id: str
    chunks: AsyncIterator[JSON]
    usage: JSON | None = None
    provider: str = ""


class ChatService:
    """Resolves the model or chain a client named, and calls its providers."""

    def __init__(
        self,
        storage: Storage,
        *,
        mock_defaults: MockBehaviour | None = None,
        upstream: UpstreamSettings | None = None,
        credentials: CredentialSource | None = None,
        prompts: PromptExpander | None = None,
        bus: InvalidationBus | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`bus`: cached routes are dropped on its `ROUTES_TOPIC` (a model, chain or credential
        changed); without one, only `invalidate` drops them."""
        self._storage = storage
        self._config = upstream or UpstreamSettings()
        self.credentials: CredentialSource = credentials or EnvCredentials(storage)
        self.prompts = prompts
        self._clock = clock
        self._pool = HttpPool(
            max_connections=self._config.max_connections, policy=self._config.policy
        )
        self.mock = MockProvider(mock_defaults)
        openai = OpenAIProvider(self._pool)
        self.providers: dict[Provider, ChatProvider] = {
            Provider.MOCK: self.mock,
            Provider.OPENAI: openai,
            Provider.CUSTOM: openai,
            Provider.ANTHROPIC: AnthropicProvider(self._pool),
            Provider.AZURE_OPENAI: AzureOpenAIProvider(self._pool),
        }
        self.breakers = CircuitBreakers(
            threshold=self._config.breaker_threshold,
            cooldown=self._config.breaker_cooldown,
            clock=clock,
        )
        # A route expired less than a lifetime ago is answered while one reload runs in the
        # background, so no call waits for the database (a failed reload drops it).
        lifetime = self._config.route_cache_seconds
        self._routes: LoadingCache[str, tuple[Route, ModelKind]] = LoadingCache(
            lambda name: self._load_route(name), ttl=lifetime, grace=lifetime, clock=clock
        )
        if bus is not None:
            bus.on(ROUTES_TOPIC, lambda item: self.invalidate(None if item == ALL else item))

    async def close(self) -> None:
        """Close the upstream connection pools."""
        await self._pool.close()

    def invalidate(self, name: str | None = None) -> None:
        """Forget cached routes (all, or the one for `name`) after a model or chain changed."""
        if name is None:
            self._routes.clear()
        else:
            self._routes.forget(name)

    # --- resolve ----------------------------------------------------------------------------

    async def resolve(self, name: str, *, kind: ModelKind = ModelKind.CHAT) -> Route:
        """The route for the model or chain `name`; unknown or disabled is `NotFound`."""
        cached = self._routes.get(name)
        if cached is None:
            if self._config.route_cache_seconds <= 0:
                cached = await self._load_route(name)
            else:
                cached = await self._routes.load(name)
        route, route_kind = cached
        if route_kind is not kind:
            raise InvalidInput(
                f"model '{name}' is a {route_kind.value} model and cannot serve this endpoint",
                param="model",
            )
        return route

    async def _load_route(self, name: str) -> tuple[Route, ModelKind]:
        async with self._storage.unit_of_work() as uow:
            model = await uow.repo(Model).get(name)
            chain = None if model is not None else await uow.repo(ModelChain).get(name)
            if chain is not None and chain.enabled:
                ids = [str(s.get("model_id")) for s in chain.steps]
                models = {m.id: m for m in await uow.repo(Model).get_many(ids)}
        if model is not None:
            if not model.enabled:
                raise NotFound("model", name, param="model")
            step = Step(
                upstream=await self._upstream(model),
                max_retries=int(model.parameters.get("max_retries", self._config.max_retries)),
                backoff_ms=int(model.parameters.get("backoff_ms", 200)),
            )
            return Route(name=name, steps=(step,)), model.kind
        if chain is None or not chain.enabled:
            raise NotFound("model", name, param="model")
        steps: list[Step] = []
        kinds: set[ModelKind] = set()
        for raw in chain.steps:
            target = models.get(str(raw.get("model_id")))
            # A disabled or removed model drops out of the chain; the chain itself stays usable.
            if target is None or not target.enabled:
                continue
            kinds.add(target.kind)
            steps.append(
                Step(
                    upstream=await self._upstream(target),
                    max_retries=int(raw.get("max_retries") or 0),
                    backoff_ms=int(raw.get("backoff_ms") or 0),
                    latency_threshold_ms=raw.get("latency_threshold_ms"),
                )
            )
        if not steps:
            raise NotFound("model", name, param="model")
        if len(kinds) > 1:
            raise InvalidInput(f"chain '{name}' mixes chat and embedding models", param="model")
        return Route(name=name, steps=tuple(steps), chain=True), kinds.pop()

    async def _upstream(self, model: Model) -> Upstream:
        if model.provider not in self.providers:
            raise InvalidInput(
                f"model '{model.id}' uses provider '{model.provider}', which cannot serve chat "
                "or embeddings",
                param="model",
            )
        parameters = model.parameters
        secret = endpoint = api_version = header_name = header_template = None
        if model.credential_id is not None:
            revealed = await self.credentials.reveal(model.credential_id)
            secret, endpoint, api_version = revealed.secret, revealed.endpoint, revealed.api_version
            header_name, header_template = revealed.header_name, revealed.header_value_template
        base_url = parameters.get("base_url") or endpoint
        if model.provider is Provider.AZURE_OPENAI and not base_url:
            raise Unavailable(f"model '{model.id}' has no Azure endpoint configured")
        if base_url and has_url_credentials(base_url):
            # Only rows stored before the API refused them; checked once per route load.
            where = (
                f"the parameters.base_url of model '{model.id}'"
                if parameters.get("base_url")
                else f"the endpoint of credential '{model.credential_id}'"
            )
            raise Unavailable(
                f"{where} carries a user name or password (user:pass@); put credentials in "
                "the credential's secret, not in the endpoint URL"
            )
        return Upstream(
            model_id=model.id,
            provider=model.provider,
            provider_model=model.provider_model,
            base_url=base_url,
            secret=secret,
            api_version=parameters.get("api_version") or api_version,
            header_name=header_name,
            header_value_template=header_template,
            parameters=parameters,
            timeout=float(parameters.get("timeout_s", self._config.timeout)),
            connect_timeout=self._config.connect_timeout,
            config_version=model.config_version,
        )

    # --- prepare ----------------------------------------------------------------------------

    async def prepare(self, request: ChatCompletionRequest, checked: JSON | None = None) -> JSON:
        """The request as an OpenAI body (without `model`), prompt references rendered.

        `checked`: what `request.check()` returned, when the caller already checked it.
        """
        body = request.check() if checked is None else checked
        for name in ("model", "stream", "stream_options"):
            body.pop(name, None)
        if request.has_prompt_references():
            if self.prompts is None:
                raise InvalidInput("stored prompts are not available", param="messages")
            body["messages"] = await self.prompts.expand_messages(body["messages"])
        return body

    @staticmethod
    def _with_defaults(upstream: Upstream, body: JSON) -> JSON:
        parameters = upstream.parameters
        if not parameters:
            return body
        merged = {k: parameters[k] for k in SAMPLING_DEFAULTS if k in parameters}
        merged.update(body)
        system = parameters.get("system_prompt")
        messages = merged.get("messages") or []
        if system and not any(m.get("role") in ("system", "developer") for m in messages):
            merged["messages"] = [{"role": "system", "content": system}, *messages]
        return merged

    # --- call -------------------------------------------------------------------------------

    async def call(self, route: Route, body: JSON) -> ChatAnswer:
        """The first answer along `route`, as the client sees it: `model` is the gateway model
        that answered."""

        async def attempt(upstream: Upstream) -> JSON:
            provider = self.providers[upstream.provider]
            return await provider.chat(upstream, self._with_defaults(upstream, body))

        step, answer = await run_route(route, attempt, self.breakers)
        answer["model"] = step.upstream.model_id
        answer.setdefault("object", "chat.completion")
        return ChatAnswer(step.upstream.model_id, answer, step.upstream.provider.value)

    # --- stream -----------------------------------------------------------------------------

    async def open_stream(self, route: Route, body: JSON, include_usage: bool) -> ChatStream:
        """A stream along `route` whose first chunk has arrived, so failures before it can
        still fall back; `include_usage`: the client asked for the usage chunk."""

        async def attempt(upstream: Upstream) -> tuple[AsyncIterator[JSON], JSON]:
            provider = self.providers[upstream.provider]
            chunks = provider.stream(upstream, self._with_defaults(upstream, body))
            return chunks, await anext(chunks)

        step, (chunks, first) = await run_route(route, attempt, self.breakers)
        stream = ChatStream(step.upstream.model_id, chunks, provider=step.upstream.provider.value)
        stream.chunks = self._relay(stream, first, chunks, include_usage)
        return stream

    async def _relay(
        self, stream: ChatStream, first: JSON, chunks: AsyncIterator[JSON], include_usage: bool
    ) -> AsyncIterator[JSON]:
        model_id = stream.model_id
        try:
            chunk: JSON | None = first
            while chunk is not None:
                chunk["model"] = model_id
                usage = chunk.get("usage")
                if usage:
                    stream.usage = usage
                if chunk.get("choices"):
                    if usage and not include_usage:
                        del chunk["usage"]
                    yield chunk
                elif usage and include_usage:
                    yield chunk
                chunk = await anext(chunks, None)
        except DomainError as exc:
            if isinstance(exc, UpstreamUnavailable | UpstreamTimeout):
                self.breakers.failure(model_id)
            raise
        finally:
            close = getattr(chunks, "aclose", None)
            if close is not None:
                await close()

    # --- embeddings -------------------------------------------------------------------------

    async def embed(self, request: EmbeddingRequest) -> ChatAnswer:
        """An OpenAI embeddings `list` object, with the model and provider that answered."""
        route = await self.resolve(request.model, kind=ModelKind.EMBEDDING)
        inputs = request.inputs()

        async def attempt(upstream: Upstream) -> Any:
            provider = self.providers[upstream.provider]
            return await provider.embed(upstream, inputs, request.dimensions)

        step, result = await run_route(route, attempt, self.breakers)
        data = []
        for index, vector in enumerate(result.vectors):
            value: list[float] | str = vector
            if request.encoding_format == "base64":
                value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": value})
        model_id = step.upstream.model_id
        usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
        body = {"object": "list", "data": data, "model": model_id, "usage": usage}
        return ChatAnswer(model_id, body, step.upstream.provider.value)


BUILTIN_MODELS: tuple[Model, ...] = (
    Model(
        id="mock",
        name="Mock",
        description="Built-in offline model: deterministic replies, no upstream account needed.",
        provider=Provider.MOCK,
        provider_model="mock",
        context_window=128_000,
    ),
    Model(
        id="mock-embedding",
        name="Mock embeddings",
        description="Built-in offline embeddings: a hashed bag of words, 256 dimensions.",
        kind=ModelKind.EMBEDDING,
        provider=Provider.MOCK,
        provider_model="mock-embedding",
    ),
)


async def ensure_builtin_models(storage: Storage) -> None:
    """Create the built-in models that are missing (the `mock` model exists in every install)."""
    try:
        async with storage.unit_of_work() as uow:
            repo = uow.repo(Model)
            missing = [m for m in BUILTIN_MODELS if await repo.get(m.id) is None]
            for model in missing:
                await repo.add(model.model_copy())
            if missing:
                await uow.commit()
    except DuplicateKey:
        pass  # another process created them at the same moment

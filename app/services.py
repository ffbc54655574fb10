"""The services of one process, built once by a composition root (API lifespan, worker)."""

from __future__ import annotations

from dataclasses import dataclass, field

import redis.asyncio as aioredis

from app.access.service import ApiKeyService
from app.access.teams import TeamService
from app.access.throttle import LoginThrottle, ThrottleLimits
from app.access.tokens import TokenCodec
from app.access.users import UserService
from app.batches.service import BatchService, FileService
from app.config import BrokerKind, Settings
from app.core.crypto import SecretBox
from app.core.events import EventSink
from app.core.invalidation import InvalidationBus
from app.core.outbound import OutboundClient, OutboundPolicy
from app.credentials.service import CredentialService
from app.gateway.cache import CacheControl, Embedder, build_response_cache, tenant_of
from app.gateway.chains import ChainService
from app.gateway.chat import ChatService, UpstreamSettings
from app.gateway.providers.mock import MockBehaviour
from app.gateway.schemas import ChatCompletionRequest, EmbeddingRequest
from app.models.entities import ModelKind
from app.models.service import ModelService
from app.operations.entities import OperationKind
from app.operations.runner import Handler, JobContext, JobTimings
from app.operations.service import OperationService
from app.prompts.service import PromptService
from app.queue.batches import DramatiqBatchSender
from app.queue.port import DramatiqQueue, JobQueue
from app.settings.registry import registry_for
from app.settings.service import CONFIG_TOPIC, ConfigService
from app.storage.protocol import Storage
from app.usage.admission import Caller
from app.usage.entities import UsageType
from app.usage.metering import Metering
from app.usage.pricing import estimate_message_tokens
from app.usage.wiring import Accounting, app_config_value, build_accounting
from app.webhooks.service import WebhookConfig, WebhookService


@dataclass
class Services:
    """Every service, sharing one storage backend and one queue port."""

    settings: Settings
    storage: Storage
    queue: JobQueue
    # Counters, caches, locks and invalidation messages (the in-process stand-in in dev mode).
    redis: aioredis.Redis
    events: EventSink
    operations: OperationService
    chat: ChatService
    # The one client for user-configured URLs, and the webhooks (also the `events` sink).
    outbound: OutboundClient
    webhooks: WebhookService
    # Built from the fields above, so adding them needs no change to the composition roots.
    files: FileService = field(init=False)
    batches: BatchService = field(init=False)
    credentials: CredentialService = field(init=False)
    models: ModelService = field(init=False)
    prompts: PromptService = field(init=False)
    chains: ChainService = field(init=False)
    # Rate limits, budgets, usage records and execution logs; `metering` is what calls use.
    accounting: Accounting = field(init=False)
    # Access: API keys, users and their sessions, teams, app configuration, and the channel that
    # drops their cached copies in every process.
    invalidation: InvalidationBus = field(init=False)
    keys: ApiKeyService = field(init=False)
    users: UserService = field(init=False)
    teams: TeamService = field(init=False)
    config: ConfigService = field(init=False)

    def __post_init__(self) -> None:
        self.invalidation = InvalidationBus(
            self.redis, shared=self.settings.BROKER is BrokerKind.REDIS
        )
        self.webhooks.watch(self.invalidation)
        self.keys = ApiKeyService(self.storage, events=self.events, bus=self.invalidation)
        self.users = UserService(
            self.storage,
            self.redis,
            TokenCodec(self.settings),
            LoginThrottle(self.redis, ThrottleLimits.of(self.settings)),
        )
        self.teams = TeamService(self.storage, self.invalidation)
        self.config = ConfigService(
            self.storage, self.invalidation, registry=registry_for(self.settings)
        )
        self.files = FileService(self.storage, max_bytes=self.settings.FILE_MAX_BYTES)
        self.batches = BatchService(
            self.storage,
            self.operations,
            self.files,
            self.events,
            max_requests=self.settings.BATCH_MAX_REQUESTS,
        )
        self.chat.cache = build_response_cache(
            self.settings, redis=self.redis, embed=_embedder(self.chat, self.settings)
        )
        self.credentials = CredentialService(
            self.storage,
            SecretBox(self.settings.secret_keys()),
            outbound=self.outbound,
            on_change=self.chat.invalidate,
        )
        self.models = ModelService(
            self.storage,
            on_change=self.chat.invalidate,
            bus=self.invalidation,
            policy=self.outbound.policy,
        )
        self.prompts = PromptService(self.storage)
        self.chat.credentials = self.credentials
        self.chat.prompts = self.prompts
        self.chains = ChainService(self.storage, on_change=self.chat.invalidate)
        self.accounting = build_accounting(
            self.settings,
            self.storage,
            self.redis,
            self.events,
            sender=(
                DramatiqBatchSender(self.queue.broker)
                if isinstance(self.queue, DramatiqQueue)
                else None
            ),
            config=lambda key: app_config_value(self, key),
            bus=self.invalidation,
        )
        # The default rate limits may come from the app configuration.
        self.invalidation.on(CONFIG_TOPIC, lambda _key: self.metering.forget("defaults"))

    @property
    def metering(self) -> Metering:
        """What every LLM call goes through: `admit`, then `settle` or `release`."""
        return self.accounting.metering


def _embedder(chat: ChatService, settings: Settings) -> Embedder | None:
    """The semantic cache's embeddings: CACHE_SEMANTIC_MODEL through the gateway's own route."""
    model = settings.CACHE_SEMANTIC_MODEL
    if model is None:
        return None

    async def embed(texts: list[str]) -> list[list[float]]:
        _, body = await chat.embed(EmbeddingRequest(model=model, input=texts))
        return [list(item["embedding"]) for item in body["data"]]

    return embed


def build_services(
    settings: Settings, storage: Storage, queue: JobQueue, redis: aioredis.Redis
) -> Services:
    mock = MockBehaviour(
        latency_ms=settings.MOCK_LATENCY_MS, failure_rate=settings.MOCK_FAILURE_RATE
    )
    operations = OperationService(storage, queue, max_attempts=settings.JOB_MAX_ATTEMPTS)
    outbound = OutboundClient(OutboundPolicy.parse(settings.OUTBOUND_ALLOWED_HOSTS))
    webhooks = WebhookService(
        storage,
        operations,
        SecretBox(settings.secret_keys()),
        outbound,
        WebhookConfig(
            schedule=tuple(settings.webhook_retry_schedule()),
            timeout=settings.WEBHOOK_TIMEOUT_SECONDS,
            disable_after=settings.WEBHOOK_DISABLE_AFTER_SECONDS,
            rotation_overlap=settings.WEBHOOK_ROTATION_OVERLAP_SECONDS,
            retention=settings.WEBHOOK_DELIVERY_RETENTION_SECONDS,
        ),
    )
    # The sink submits delivery jobs through `operations`, which emits through the sink.
    operations.events = webhooks
    return Services(
        settings=settings,
        storage=storage,
        queue=queue,
        redis=redis,
        events=webhooks,
        operations=operations,
        outbound=outbound,
        webhooks=webhooks,
        chat=ChatService(
            storage,
            mock_defaults=mock,
            upstream=UpstreamSettings(
                timeout=settings.UPSTREAM_TIMEOUT_SECONDS,
                connect_timeout=settings.UPSTREAM_CONNECT_TIMEOUT_SECONDS,
                max_retries=settings.UPSTREAM_MAX_RETRIES,
                max_connections=settings.UPSTREAM_MAX_CONNECTIONS,
                breaker_threshold=settings.BREAKER_FAILURE_THRESHOLD,
                breaker_cooldown=settings.BREAKER_COOLDOWN_SECONDS,
                route_cache_seconds=settings.ROUTE_CACHE_SECONDS,
                policy=outbound.policy,
            ),
        ),
    )


def job_timings(settings: Settings) -> JobTimings:
    return JobTimings(
        lease=settings.JOB_LEASE_SECONDS,
        heartbeat=settings.JOB_HEARTBEAT_SECONDS or settings.JOB_LEASE_SECONDS / 3,
        retry_base=settings.JOB_RETRY_BASE_SECONDS,
        retry_max=settings.JOB_RETRY_MAX_SECONDS,
        resend_after=settings.JOB_RESEND_AFTER_SECONDS,
        retention=settings.JOB_RETENTION_SECONDS,
    )


def build_handlers(services: Services) -> dict[OperationKind, Handler]:
    """What a worker runs for each kind of job."""

    def owner(ctx: JobContext) -> Caller:
        return Caller(ctx.operation.owner_key_id, ctx.operation.owner_team_id)

    async def chat_completion(ctx: JobContext) -> object:
        request = ChatCompletionRequest.model_validate(ctx.operation.input)
        # The key's permissions as they are when the job runs (async calls and batch lines).
        await services.keys.ensure_job_allowed(
            ctx.operation.owner_key_id, request.model, request.messages
        )
        await ctx.checkpoint()  # before the upstream call: a cancelled job makes none
        # Rate limits and budgets apply when the job runs, as they do to a direct call.
        route = await services.chat.resolve(request.model)
        async with services.metering.metered(
            owner(ctx),
            route.steps[0].upstream.model_id,
            estimate_message_tokens(m.text() for m in request.messages),
            request.max_completion_tokens or request.max_tokens,
            operation_id=ctx.operation.id,
            is_async=True,
        ) as call:
            answer = await services.chat.complete(
                request,
                tenant=tenant_of(ctx.operation.owner_team_id, ctx.operation.owner_key_id),
                cache_control=CacheControl.parse(ctx.operation.meta.get("cache_control")),
            )
            call.done_with_usage(
                answer.usage,
                model_id=answer.model_id,
                cache_hit=answer.cache is not None and answer.cache.hit,
                request_body=request,
                response_body=answer.body,
            )
        return answer.body

    async def embedding(ctx: JobContext) -> object:
        request = EmbeddingRequest.model_validate(ctx.operation.input)
        await services.keys.ensure_job_allowed(ctx.operation.owner_key_id, request.model)
        await ctx.checkpoint()
        route = await services.chat.resolve(request.model, kind=ModelKind.EMBEDDING)
        async with services.metering.metered(
            owner(ctx),
            route.steps[0].upstream.model_id,
            estimate_message_tokens(request.inputs()),
            0,
            usage_type=UsageType.EMBEDDING,
            operation_id=ctx.operation.id,
            is_async=True,
        ) as call:
            model_id, body = await services.chat.embed(request)
            call.done_with_usage(body.get("usage"), model_id=model_id)
        return body

    async def webhook_delivery(ctx: JobContext) -> object:
        return await services.webhooks.deliver(
            str(ctx.operation.input["delivery_id"]),
            operation_id=ctx.operation.id,
            attempt=ctx.attempt,
            max_attempts=ctx.operation.max_attempts,
        )

    return {
        OperationKind.CHAT_COMPLETION: chat_completion,
        OperationKind.WEBHOOK_DELIVERY: webhook_delivery,
        OperationKind.EMBEDDING: embedding,
    }

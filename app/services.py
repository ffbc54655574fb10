"""The services of one process, built once by a composition root (API lifespan, worker)."""

from __future__ import annotations

import typing
from dataclasses import dataclass, fields

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
from app.core.invalidation import ALL, ROUTES_TOPIC, InvalidationBus
from app.core.outbound import OutboundClient, OutboundPolicy
from app.credentials.service import CredentialService
from app.datasets.service import DatasetService
from app.evals.execution import RunExecutor, WorkflowRunner
from app.evals.jobs import eval_handlers
from app.evals.service import EvalService
from app.experiments.batches import BatchRunner
from app.experiments.jobs import experiment_handlers
from app.experiments.live import LiveExperiments
from app.experiments.service import ExperimentService
from app.gateway.cache import build_response_cache
from app.gateway.calls import GatewayCalls, Keyless
from app.gateway.chains import ChainService
from app.gateway.chat import ChatService, UpstreamSettings
from app.gateway.jobs import gateway_handlers
from app.gateway.providers.mock import MockBehaviour
from app.gateway.schemas import EmbeddingRequest
from app.knowledge.index import MatrixIndex, SearchIndex
from app.knowledge.jobs import knowledge_handlers
from app.knowledge.service import KnowledgeLimits, KnowledgeService
from app.knowledge.steps import KnowledgeSteps
from app.logs.service import LogService
from app.models.service import ModelService
from app.operations.runner import Handler, JobTimings
from app.operations.service import OperationService
from app.operations.submit import JobSubmitter
from app.prompts.service import PromptService
from app.queue.names import OperationKind
from app.queue.port import JobQueue
from app.settings.registry import registry_for
from app.settings.service import CONFIG_TOPIC, ConfigService
from app.storage.protocol import Storage
from app.usage.budgets import BudgetService
from app.usage.metering import Metering
from app.usage.service import UsageService
from app.usage.wiring import Accounting, app_config_reader, build_accounting
from app.webhooks.jobs import webhook_handlers
from app.webhooks.service import WebhookConfig, WebhookService
from app.workflows.cases import WorkflowCases
from app.workflows.engine import WorkflowEngine
from app.workflows.jobs import workflow_handlers
from app.workflows.service import ExternalApiService, WorkflowService
from app.workflows.steps.base import StepDeps


@dataclass
class Services:
    """Every service of one process, each built with what it depends on (`build_services`)."""

    settings: Settings
    storage: Storage
    queue: JobQueue
    # Counters, caches, locks and invalidation messages (the in-process stand-in in dev mode).
    redis: aioredis.Redis
    # The channel that drops cached copies (keys, configuration, routes, limits) everywhere.
    invalidation: InvalidationBus
    # The one client for user-configured URLs.
    outbound: OutboundClient
    # Subscriptions and deliveries; also the `events` sink every service records events on.
    webhooks: WebhookService
    events: EventSink
    operations: OperationService
    keys: ApiKeyService
    users: UserService
    teams: TeamService
    config: ConfigService
    files: FileService
    batches: BatchService
    credentials: CredentialService
    models: ModelService
    prompts: PromptService
    chains: ChainService
    chat: ChatService
    # Rate limits, budgets, usage records and execution logs.
    accounting: Accounting
    # The one path of every LLM call: permissions, admission, cache, upstream, settlement.
    calls: GatewayCalls
    # Knowledge bases: documents ingested as jobs, chunks searched.
    knowledge: KnowledgeService
    # The running experiments, which the call path asks to enrol calls in a variant.
    live_experiments: LiveExperiments
    datasets: DatasetService
    experiments: ExperimentService
    experiment_batches: BatchRunner
    # Test cases, suites and runs; `evaluator` executes runs in their jobs.
    evals: EvalService
    evaluator: RunExecutor
    external_apis: ExternalApiService
    # Runs `workflow_run` jobs (the workers' handler, and synchronous runs in the API).
    engine: WorkflowEngine
    workflows: WorkflowService

    @property
    def metering(self) -> Metering:
        return self.accounting.metering

    def by_type(self) -> dict[type, object]:
        """Every service under its declared type: what routes are handed (`app.core.provide`)."""
        hints = typing.get_type_hints(type(self))
        provided: dict[type, object] = {hints[f.name]: getattr(self, f.name) for f in fields(self)}
        accounting = self.accounting
        provided.update(
            {
                Metering: accounting.metering,
                UsageService: accounting.usage,
                BudgetService: accounting.budgets,
                LogService: accounting.logs,
            }
        )
        return provided

    async def start(self) -> None:
        """Start the background work of these services: following invalidations."""
        await self.invalidation.start()

    async def aclose(self) -> None:
        """Stop the background work and close what these services opened; usage not written
        yet, experiment records and `last_used_at` instants go out first. Storage, queue and
        Redis stay open: they belong to whoever passed them in."""
        await self.invalidation.stop()
        await self.workflows.aclose()  # a synchronous run still going resumes in a worker
        await self.keys.close()
        await self.live_experiments.close()
        await self.metering.close()
        await self.outbound.aclose()
        await self.chat.close()


def build_services(
    settings: Settings,
    storage: Storage,
    queue: JobQueue,
    redis: aioredis.Redis,
    *,
    workflows: WorkflowRunner | None = None,
) -> Services:
    """The composition root of the services: each built once, from the ones it depends on.

    `workflows` runs the workflows test cases target (by default the workflow engine's own).
    """
    invalidation = InvalidationBus(redis, shared=settings.BROKER is BrokerKind.REDIS)
    box = SecretBox(settings.secret_keys())
    outbound = OutboundClient(OutboundPolicy.parse(settings.OUTBOUND_ALLOWED_HOSTS))
    # The sink submits its delivery jobs with a submitter of its own; jobs emit through it.
    webhooks = WebhookService(
        storage,
        JobSubmitter(storage, queue, max_attempts=settings.JOB_MAX_ATTEMPTS),
        box,
        outbound,
        WebhookConfig(
            schedule=tuple(settings.webhook_retry_schedule()),
            timeout=settings.WEBHOOK_TIMEOUT_SECONDS,
            disable_after=settings.WEBHOOK_DISABLE_AFTER_SECONDS,
            rotation_overlap=settings.WEBHOOK_ROTATION_OVERLAP_SECONDS,
            retention=settings.WEBHOOK_DELIVERY_RETENTION_SECONDS,
        ),
        bus=invalidation,
    )
    operations = OperationService(
        storage, queue, max_attempts=settings.JOB_MAX_ATTEMPTS, events=webhooks
    )
    keys = ApiKeyService(storage, events=webhooks, bus=invalidation)
    config = ConfigService(storage, invalidation, registry=registry_for(settings))
    files = FileService(storage, max_bytes=settings.FILE_MAX_BYTES)

    def routes_changed(name: str | None) -> None:
        invalidation.dispatch(ROUTES_TOPIC, name or ALL)

    models = ModelService(
        storage, on_change=routes_changed, bus=invalidation, policy=outbound.policy
    )
    credentials = CredentialService(
        storage, box, outbound=outbound, on_change=routes_changed, users=models
    )
    prompts = PromptService(storage)
    chat = ChatService(
        storage,
        mock_defaults=MockBehaviour(
            latency_ms=settings.MOCK_LATENCY_MS, failure_rate=settings.MOCK_FAILURE_RATE
        ),
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
        credentials=credentials,
        prompts=prompts,
        bus=invalidation,
    )
    accounting = build_accounting(
        settings,
        storage,
        redis,
        webhooks,
        config=app_config_reader(config),
        bus=invalidation,
    )
    # The default rate limits may come from the app configuration.
    invalidation.on(CONFIG_TOPIC, lambda _key: accounting.metering.forget("defaults"))
    live_experiments = LiveExperiments(storage, invalidation)
    embeddings = (
        CacheEmbeddings(settings.CACHE_SEMANTIC_MODEL) if settings.CACHE_SEMANTIC_MODEL else None
    )
    calls = GatewayCalls(
        chat,
        accounting.metering,
        keys,
        operations,
        cache=build_response_cache(settings, redis=redis, embed=embeddings),
        variants=live_experiments,
    )
    if embeddings is not None:
        embeddings.calls = calls
    knowledge = KnowledgeService(
        storage,
        operations,
        calls,
        _search_index(settings, storage),
        bus=invalidation,
        limits=KnowledgeLimits(
            max_document_bytes=settings.KNOWLEDGE_MAX_DOCUMENT_BYTES,
            max_chunks=settings.KNOWLEDGE_MAX_CHUNKS,
            embed_batch=settings.KNOWLEDGE_EMBED_BATCH,
        ),
    )
    engine = WorkflowEngine(
        StepDeps(calls, outbound, credentials, storage, KnowledgeSteps(knowledge))
    )
    case_workflows = workflows or WorkflowCases(storage, engine)
    datasets = DatasetService(storage)
    return Services(
        settings=settings,
        storage=storage,
        queue=queue,
        redis=redis,
        invalidation=invalidation,
        outbound=outbound,
        webhooks=webhooks,
        events=webhooks,
        operations=operations,
        keys=keys,
        users=UserService(
            storage,
            redis,
            TokenCodec(settings),
            LoginThrottle(redis, ThrottleLimits.of(settings)),
        ),
        teams=TeamService(storage, invalidation),
        config=config,
        files=files,
        batches=BatchService(
            storage, operations, files, webhooks, max_requests=settings.BATCH_MAX_REQUESTS
        ),
        credentials=credentials,
        models=models,
        prompts=prompts,
        chains=ChainService(storage, on_change=routes_changed),
        chat=chat,
        accounting=accounting,
        calls=calls,
        knowledge=knowledge,
        evals=EvalService(storage, operations, models, prompts, workflows=case_workflows),
        evaluator=RunExecutor(storage, calls, workflows=case_workflows, events=webhooks),
        external_apis=ExternalApiService(storage, outbound.policy),
        engine=engine,
        workflows=WorkflowService(
            storage,
            queue,
            operations,
            engine,
            timings=job_timings(settings),
            events=webhooks,
            sync_timeout=settings.WORKFLOW_SYNC_TIMEOUT_SECONDS,
            max_wait=settings.LONG_POLL_MAX_SECONDS,
        ),
        live_experiments=live_experiments,
        datasets=datasets,
        experiments=ExperimentService(
            storage,
            invalidation,
            chat=chat,
            prompts=prompts,
            datasets=datasets,
            operations=operations,
            records=live_experiments.records,
        ),
        experiment_batches=BatchRunner(storage, calls, datasets),
    )


class CacheEmbeddings:
    """The semantic cache's embeddings: CACHE_SEMANTIC_MODEL through the gateway's one call
    path, recorded as the gateway's own usage (no key, no team: made on behalf of the call being
    cached, not billed to its caller; a global budget counts them). `calls` is set once built
    (the calls hold the cache that holds this)."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.calls: GatewayCalls | None = None

    async def __call__(self, texts: list[str]) -> list[list[float]]:
        if self.calls is None:
            raise RuntimeError("the semantic cache's embeddings are not wired to the gateway yet")
        answer = await self.calls.embed(Keyless(), EmbeddingRequest(model=self.model, input=texts))
        return [list(item["embedding"]) for item in answer.body["data"]]


def _search_index(settings: Settings, storage: Storage) -> SearchIndex:
    """The exact index, or the approximate one over it (KNOWLEDGE_SEARCH_INDEX)."""
    exact = MatrixIndex(storage)
    if settings.KNOWLEDGE_SEARCH_INDEX == "hnsw":
        from app.knowledge.approximate import HnswIndex

        return HnswIndex(exact, min_chunks=settings.KNOWLEDGE_HNSW_MIN_CHUNKS)
    return exact


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
    """What a worker runs for each kind of job: every domain's handlers (its `jobs.py`)."""
    handlers: dict[OperationKind, Handler] = {}
    for domain in (
        gateway_handlers(services.calls),
        webhook_handlers(services.webhooks),
        knowledge_handlers(services.knowledge),
        experiment_handlers(services.experiment_batches),
        eval_handlers(services.evaluator),
        workflow_handlers(services.engine),
    ):
        overlap = handlers.keys() & domain.keys()
        if overlap:
            raise RuntimeError(f"two handlers for {sorted(overlap)}")
        handlers.update(domain)
    return handlers

"""The services of one process, built once by a composition root (API lifespan, worker)."""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis

from app.access.service import ApiKeyService
from app.config import Settings
from app.core.events import EventSink, NullSink
from app.gateway.chat import ChatService
from app.gateway.mock import MockBehaviour
from app.gateway.schemas import ChatCompletionRequest
from app.operations.entities import OperationKind
from app.operations.runner import Handler, JobContext, JobTimings
from app.operations.service import OperationService
from app.queue.port import JobQueue
from app.storage.protocol import Storage


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
    keys: ApiKeyService


def build_services(
    settings: Settings, storage: Storage, queue: JobQueue, redis: aioredis.Redis
) -> Services:
    mock = MockBehaviour(
        latency_ms=settings.MOCK_LATENCY_MS, failure_rate=settings.MOCK_FAILURE_RATE
    )
    return Services(
        settings=settings,
        storage=storage,
        queue=queue,
        redis=redis,
        events=NullSink(),
        operations=OperationService(storage, queue, max_attempts=settings.JOB_MAX_ATTEMPTS),
        chat=ChatService(storage, mock_defaults=mock),
        keys=ApiKeyService(storage),
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

    async def chat_completion(ctx: JobContext) -> object:
        request = ChatCompletionRequest.model_validate(ctx.operation.input)
        await ctx.checkpoint()  # before the upstream call: a cancelled job makes none
        return await services.chat.complete(request)

    return {OperationKind.CHAT_COMPLETION: chat_completion}

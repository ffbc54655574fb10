"""The API's composition root: `create_app(settings)` builds the FastAPI application."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager

from fastapi import Depends, FastAPI

from app import __version__
from app.access.bootstrap import bootstrap_access
from app.access.deps import require_admin
from app.access.router import admin_router as access_admin_router
from app.access.router import auth_router
from app.access.teams import ADMIN_TEAM_ID
from app.batches.router import router as batches_router
from app.config import Settings
from app.core import heap, tracing
from app.core.api_errors import install_error_handlers
from app.core.errors import Unavailable
from app.core.metrics import RequestMetrics, serve_on_free_port
from app.core.middleware import BodySizeLimitMiddleware, RequestIdMiddleware
from app.core.provide import register
from app.core.redis import build_redis
from app.credentials.router import admin_router as credentials_admin_router
from app.datasets.router import admin_router as datasets_admin_router
from app.evals.router import cases_router as test_cases_router
from app.evals.router import runs_router as test_runs_router
from app.evals.router import suites_router as test_suites_router
from app.experiments.router import admin_router as experiments_admin_router
from app.experiments.router import router as feedback_router
from app.fastpath import GatewayApp
from app.gateway.chat import ensure_builtin_models
from app.gateway.router import admin_router as chains_admin_router
from app.gateway.router import router as chat_router
from app.knowledge.router import admin_router as knowledge_admin_router
from app.knowledge.router import router as knowledge_router
from app.logs.router import admin_router as logs_admin_router
from app.models.router import admin_router as models_admin_router
from app.models.router import router as models_router
from app.operations.metrics import QueueGauges
from app.operations.router import admin_router as operations_admin_router
from app.operations.router import router as operations_router
from app.prompts.router import admin_router as prompts_admin_router
from app.queue.broker import build_broker
from app.queue.port import JobQueue, build_queue
from app.services import Services, build_services
from app.settings.router import router as settings_admin_router
from app.storage.factory import build_storage
from app.storage.protocol import Storage
from app.system.checks import process_dependencies
from app.system.docs import install_docs
from app.system.metrics import router as metrics_router
from app.system.router import router as system_router
from app.usage.router import budgets_router, usage_router
from app.webhooks.router import router as webhooks_admin_router
from app.workflows.router import admin_router as workflows_admin_router
from app.workflows.router import apis_router as external_apis_admin_router
from app.workflows.router import router as workflows_router

log = logging.getLogger(__name__)

ADMIN_KEY_ID = "admin"
# How many ports from METRICS_PORT on the API's processes may take (uvicorn --workers N).
METRICS_PORT_SPAN = 64


async def bootstrap(services: Services) -> None:
    """What every install has: the built-in models, the administrators team and first user, and
    the ADMIN_API_KEY key when set."""
    await ensure_builtin_models(services.storage)
    await bootstrap_access(
        services.teams,
        services.users,
        username=services.settings.ADMIN_USERNAME,
        password=services.settings.ADMIN_DEFAULT_PASSWORD,
    )
    secret = services.settings.ADMIN_API_KEY
    if secret is not None:
        await services.keys.ensure_key(
            key_id=ADMIN_KEY_ID,
            name="Administrator",
            secret=secret.get_secret_value(),
            admin=True,
            team_id=ADMIN_TEAM_ID,
        )


class StartUp:
    """The API's start-up writes (`bootstrap`), tried again until the database takes them.

    Processes may start before `gateway migrate` has made (or migrated) their database, as
    replicas and a migration started together do: each serves meanwhile, and `/ready` says
    not ready, naming the reason, until its start-up is done.
    """

    def __init__(self, services: Services, *, retry_max: float = 2.0) -> None:
        self._services = services
        self._retry_max = retry_max
        self.waiting: str | None = None  # why the start-up is not done, while it is not

    async def run(self) -> bool:
        """Bootstrap once; True when done, False (and the reason kept) when the database is
        not ready for it."""
        try:
            await bootstrap(self._services)
        except Unavailable as exc:
            self.waiting = exc.message
            return False
        self.waiting = None
        return True

    async def run_until_done(self) -> None:
        delay = 0.1
        while not await self.run():
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._retry_max)
        log.info("start-up finished once the database was ready")

    async def check(self) -> None:
        """Raise `Unavailable` while the start-up is not done (a `/ready` probe)."""
        if self.waiting is not None:
            raise Unavailable(f"start-up not finished: {self.waiting}")


def create_app(
    settings: Settings | None = None,
    *,
    storage: Storage | None = None,
    queue: JobQueue | None = None,
) -> FastAPI:
    """The API application; it builds (and closes) storage and queue unless they are passed in."""
    settings = settings or Settings()
    tracing.configure(settings.OTEL_EXPORTER_OTLP_ENDPOINT, settings.otel_service_name())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            stack.callback(tracing.flush)  # last: the spans of the shutdown go out too
            if storage is None:
                app.state.storage = build_storage(settings)
                stack.push_async_callback(app.state.storage.close)
            else:
                app.state.storage = storage
            jobs: JobQueue
            if queue is None:
                jobs = build_queue(settings, build_broker(settings))
                stack.push_async_callback(jobs.aclose)
            else:
                jobs = queue
            redis = build_redis(settings)
            stack.push_async_callback(redis.aclose)
            app.state.services = build_services(settings, app.state.storage, jobs, redis)
            register(app, app.state.services.by_type())
            start_up = StartUp(app.state.services)
            # What /ready probes: the database and Redis those services use, and the start-up.
            app.state.dependencies = process_dependencies(
                settings, app.state.storage, redis, started=start_up.check
            )
            # Closed before Redis and storage: usage not yet written goes out first.
            await app.state.services.start()
            stack.push_async_callback(app.state.services.aclose)
            if not await start_up.run():
                # Serve anyway: /ready says why not ready, and requests fail clearly meanwhile.
                log.warning("start-up waits for the database: %s", start_up.waiting)
                finishing = asyncio.create_task(start_up.run_until_done())
                stack.callback(finishing.cancel)
            gauges = QueueGauges(app.state.storage, max_age=settings.METRICS_QUEUE_REFRESH_SECONDS)
            app.state.metric_refreshers = [gauges.refresh_if_stale]
            if settings.METRICS_PORT is not None:
                await _serve_metrics(stack, settings, gauges.refresh)
            if settings.GC_SETTLE:
                heap.settle()
            yield

    app = GatewayApp(
        max_request_bytes=settings.MAX_REQUEST_BYTES,
        title="LLM Gateway",
        version=__version__,
        summary="One OpenAI-compatible API over many LLM providers, with durable jobs.",
        lifespan=lifespan,
        # /docs is served from local assets (`install_docs`); ReDoc would load from a CDN.
        docs_url=None,
        redoc_url=None,
        # FastAPI's own OpenTelemetry off: the gateway's spans are `app.core.tracing`'s, and
        # without this FastAPI asks the global providers whether they are set on every request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings
    install_error_handlers(app)
    install_docs(app)
    # The last added runs first: ids are assigned before anything else can answer. (Plain chat
    # completions are answered in front of this stack, by `GatewayApp`, which does the same.)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.MAX_REQUEST_BYTES)
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(RequestMetrics)  # what every other layer answered is counted
    if tracing.enabled():
        app.add_middleware(tracing.RequestTracing)  # outermost: the request's span holds all
    app.include_router(system_router)
    app.include_router(metrics_router, dependencies=[Depends(require_admin)])
    app.include_router(auth_router)
    app.include_router(access_admin_router)
    app.include_router(settings_admin_router)
    app.include_router(chat_router)
    app.include_router(chains_admin_router)
    app.include_router(operations_router)
    app.include_router(operations_admin_router)
    app.include_router(webhooks_admin_router)
    app.include_router(models_router)
    app.include_router(models_admin_router)
    app.include_router(credentials_admin_router)
    app.include_router(prompts_admin_router)
    app.include_router(test_cases_router)
    app.include_router(test_suites_router)
    app.include_router(test_runs_router)
    app.include_router(batches_router)
    app.include_router(usage_router)
    app.include_router(budgets_router)
    app.include_router(logs_admin_router)
    app.include_router(knowledge_router)
    app.include_router(knowledge_admin_router)
    app.include_router(experiments_admin_router)
    app.include_router(datasets_admin_router)
    app.include_router(feedback_router)
    app.include_router(workflows_router)
    app.include_router(workflows_admin_router)
    app.include_router(external_apis_admin_router)
    return app


async def _serve_metrics(
    stack: AsyncExitStack, settings: Settings, refresh: Callable[[], Awaitable[None]]
) -> None:
    """Metrics without credentials on METRICS_HOST:METRICS_PORT (or the next free port), on a
    thread that cannot query the database: the queue gauges are refreshed here meanwhile."""
    assert settings.METRICS_PORT is not None
    listener = serve_on_free_port(settings.METRICS_HOST, settings.METRICS_PORT, METRICS_PORT_SPAN)
    if listener is None:
        return
    stack.callback(listener.close)
    interval = max(settings.METRICS_QUEUE_REFRESH_SECONDS, 1.0)

    async def keep_fresh() -> None:
        while True:
            try:
                await refresh()
            except Exception as exc:
                log.warning("queue gauges not refreshed: %r", exc)
            await asyncio.sleep(interval)

    task = asyncio.create_task(keep_fresh())

    async def stop() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    stack.push_async_callback(stop)

"""The API's composition root: `create_app(settings)` builds the FastAPI application."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from fastapi import FastAPI

from app import __version__
from app.config import Settings
from app.core.api_errors import install_error_handlers
from app.core.errors import Unavailable
from app.core.middleware import BodySizeLimitMiddleware, RequestIdMiddleware
from app.core.redis import build_redis
from app.gateway.chat import ensure_builtin_models
from app.gateway.router import router as chat_router
from app.operations.router import admin_router as operations_admin_router
from app.operations.router import router as operations_router
from app.queue.broker import build_broker
from app.queue.port import DramatiqQueue, JobQueue
from app.services import Services, build_services
from app.storage.factory import build_storage
from app.storage.protocol import Storage
from app.system.router import router as system_router

log = logging.getLogger(__name__)

ADMIN_KEY_ID = "admin"


async def bootstrap(services: Services) -> None:
    """What every install has: the built-in models, and the ADMIN_API_KEY key when set."""
    await ensure_builtin_models(services.storage)
    secret = services.settings.ADMIN_API_KEY
    if secret is not None:
        await services.keys.ensure_key(
            key_id=ADMIN_KEY_ID, name="Administrator", secret=secret.get_secret_value(), admin=True
        )


def create_app(
    settings: Settings | None = None,
    *,
    storage: Storage | None = None,
    queue: JobQueue | None = None,
) -> FastAPI:
    """The API application; it builds (and closes) storage and queue unless they are passed in."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            if storage is None:
                app.state.storage = build_storage(settings)
                stack.push_async_callback(app.state.storage.close)
            else:
                app.state.storage = storage
            jobs = queue or DramatiqQueue(build_broker(settings))
            redis = build_redis(settings)
            stack.push_async_callback(redis.aclose)
            app.state.services = build_services(settings, app.state.storage, jobs, redis)
            try:
                await bootstrap(app.state.services)
            except Unavailable as exc:
                # Start anyway: /ready reports the database, and requests fail clearly meanwhile.
                log.warning("start-up bootstrap skipped: %s", exc.message)
            yield

    app = FastAPI(
        title="LLM Gateway",
        version=__version__,
        summary="One OpenAI-compatible API over many LLM providers, with durable jobs.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    install_error_handlers(app)
    # The last added runs first: ids are assigned before anything else can answer.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.MAX_REQUEST_BYTES)
    app.add_middleware(RequestIdMiddleware)
    app.include_router(system_router)
    app.include_router(chat_router)
    app.include_router(operations_router)
    app.include_router(operations_admin_router)
    return app

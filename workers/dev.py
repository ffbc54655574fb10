"""`gateway dev`: API, worker and periodic jobs in one process, offline by default."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import dramatiq
from fastapi import FastAPI

from app.config import MIN_ADMIN_KEY_LENGTH, Settings, StorageBackend
from app.main import create_app
from app.queue.port import DramatiqQueue
from app.seed import seed_services
from app.services import Services
from app.storage.factory import build_storage
from app.storage.memory import MemoryStore
from workers import runtime
from workers.broker import setup_broker

log = logging.getLogger(__name__)


@contextmanager
def in_process_worker(settings: Settings, broker: dramatiq.Broker) -> Iterator[dramatiq.Worker]:
    """A Dramatiq worker on threads of this process (with the periodic jobs), stopped on exit."""
    from workers import actors

    actors.bind(broker)
    # An idle consumer polls its queue with a backoff up to `worker_timeout` ms; on fakeredis
    # every poll runs a Lua script in Python, so a short ceiling keeps an idle process busy.
    worker = dramatiq.Worker(broker, worker_threads=settings.WORKER_THREADS, worker_timeout=500)
    worker.start()
    try:
        yield worker
    finally:
        worker.stop(timeout=10_000)


async def announce_key(services: Services) -> None:
    """Print a key the developer can use right away (the ADMIN_API_KEY one when it is set)."""
    if services.settings.ADMIN_API_KEY is not None:
        print("gateway dev: use the key in ADMIN_API_KEY (it has admin rights)", flush=True)
        return
    _, secret = await services.keys.create_key(name="gateway dev", admin=True)
    print(f"gateway dev: API key with admin rights for this session: {secret}", flush=True)
    print(
        "gateway dev: to keep one key across restarts, set ADMIN_API_KEY to a string of at "
        f"least {MIN_ADMIN_KEY_LENGTH} characters (e.g. in .env)",
        flush=True,
    )


def build_dev_app(settings: Settings) -> FastAPI:
    """The API with a worker inside: both share one memory store (or one database)."""
    broker = setup_broker(settings)
    store = MemoryStore() if settings.STORAGE_BACKEND is StorageBackend.MEMORY else None
    runtime.configure(settings, memory_store=store)
    storage = build_storage(settings, memory_store=store)
    app = create_app(settings, storage=storage, queue=DramatiqQueue(broker))
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app_: FastAPI) -> AsyncIterator[None]:
        try:
            async with inner(app_):
                if store is not None:
                    # Memory starts empty every time: demo data makes it answer out of the box.
                    await seed_services(app_.state.services)
                await announce_key(app_.state.services)
                with in_process_worker(settings, broker):
                    yield
        finally:
            await storage.close()

    app.router.lifespan_context = lifespan
    return app

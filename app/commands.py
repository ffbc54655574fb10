"""`gateway create-key`: an admin API key for a fresh install, printed once; and the gateway
`gateway eval run --in-process` builds inside its own process (composition roots: they build
every service of their short-lived process)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from app.access.teams import ADMIN_TEAM_ID
from app.config import Settings

if TYPE_CHECKING:
    from datetime import datetime

    import httpx

    from app.queue.names import OperationKind


async def create_admin_key(settings: Settings, *, name: str) -> str:
    """Issue an admin key in the administrators team and return its secret."""
    from app.core.redis import build_redis
    from app.queue.broker import build_broker
    from app.queue.port import DramatiqQueue
    from app.services import build_services
    from app.storage.factory import build_durable_storage

    storage = build_durable_storage(
        settings,
        why="forgets the key when this command exits",
        hint=", or run `gateway dev`, which prints a key",
    )
    redis = build_redis(settings)
    try:
        services = build_services(settings, storage, DramatiqQueue(build_broker(settings)), redis)
        await services.teams.ensure_admin_team()
        _, secret = await services.keys.create_key(
            name=name, admin=True, team_id=ADMIN_TEAM_ID, created_by="gateway create-key"
        )
    finally:
        await redis.aclose()
        await storage.close()
    return secret


class LocalQueue:
    """A job queue inside this process: each job sent is executed here by `OperationRunner`
    (what `gateway eval run --in-process` uses instead of a broker and workers)."""

    def __init__(self) -> None:
        import asyncio

        self._jobs: asyncio.Queue[str] = asyncio.Queue()

    async def send(self, operation_id: str, kind: object, *, delay: float = 0.0) -> None:
        import asyncio

        if delay > 0:
            asyncio.get_running_loop().call_later(delay, self._jobs.put_nowait, operation_id)
        else:
            self._jobs.put_nowait(operation_id)

    async def waiting_since(self) -> dict[OperationKind, datetime]:
        return {}  # the jobs it holds are this process's own: none is ever lost in transit

    async def work(self, execute: Callable[[str], Awaitable[object]], *, slots: int = 1) -> None:
        """Execute the jobs as they come, up to `slots` at once (a worker's threads: a test
        run's cases run side by side), until cancelled; a job that raises is logged (its row
        says what became of it) and the others go on."""
        import asyncio
        import logging

        async def slot() -> None:
            while True:
                operation_id = await self._jobs.get()
                try:
                    await execute(operation_id)
                except Exception:
                    logging.getLogger(__name__).exception("job %s raised", operation_id)

        await asyncio.gather(*(slot() for _ in range(max(slots, 1))))


@asynccontextmanager
async def in_process_gateway(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    """An API client over a gateway built in this process (memory storage, the mock models,
    jobs executed here), holding a fresh admin key; the client's base URL is `http://gateway`."""
    import asyncio
    import contextlib

    import httpx

    from app.main import create_app
    from app.operations.runner import OperationRunner
    from app.seed import seed_services
    from app.services import build_handlers
    from app.storage.memory import MemoryStorage

    storage = MemoryStorage()
    queue = LocalQueue()
    app = create_app(settings, storage=storage, queue=queue)
    async with app.router.lifespan_context(app):
        services = app.state.services
        await seed_services(services)
        await services.teams.ensure_admin_team()
        _, secret = await services.keys.create_key(
            name="gateway eval run", admin=True, team_id=ADMIN_TEAM_ID
        )
        runner = OperationRunner(storage, queue, build_handlers(services))
        worker = asyncio.create_task(queue.work(runner.execute, slots=settings.WORKER_THREADS))
        try:
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app),
                base_url="http://gateway",
                headers={"Authorization": f"Bearer {secret}"},
                timeout=60,
            ) as client:
                yield client, secret
        finally:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker

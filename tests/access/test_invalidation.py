"""Two API processes on one PostgreSQL and one Redis: changes reach the other's caches."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack

import httpx
import pytest

from app.access.entities import ApiKey, ApiKeyStatus
from app.access.service import PREFIX_LENGTH
from app.main import create_app
from app.storage.sql import SqlStorage, make_database
from tests.access.conftest import ADMIN, new_key, serve, services_of, settings
from tests.conftest import truncate_all
from tests.fakes import RecordingQueue

pytestmark = [pytest.mark.postgres, pytest.mark.redis]


@pytest.fixture
async def two_processes(
    database_url: str, redis_url: str
) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    """Two apps, each with its own connection pool and Redis client, as two processes have."""
    truncate_all(database_url)
    async with AsyncExitStack() as stack:
        clients = []
        for _ in range(2):
            storage = SqlStorage(make_database(database_url, pool_size=4, max_overflow=0))
            stack.push_async_callback(storage.close)
            app = create_app(
                settings(
                    STORAGE_BACKEND="postgres",
                    DATABASE_URL=database_url,
                    SECRET_KEY="invalidation-tests-secret-key-0123",
                    BROKER="redis",
                    REDIS_URL=redis_url,
                ),
                storage=storage,
                queue=RecordingQueue(storage),
            )
            client = await stack.enter_async_context(serve(app))
            await eventually(lambda c=client: subscribed(c), within=3.0)  # type: ignore[misc]
            clients.append(client)
        yield clients[0], clients[1]


async def subscribed(client: httpx.AsyncClient) -> bool:
    return services_of(client).invalidation.subscribed


async def eventually(check: Callable[[], Awaitable[bool]], *, within: float) -> float:
    """Seconds until `check` holds; fails the test after `within`."""
    started = time.monotonic()
    while not await check():
        elapsed = time.monotonic() - started
        assert elapsed < within, f"not true within {within}s"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_a_revoked_key_is_refused_by_the_other_process_within_a_second(
    two_processes: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    first, second = two_processes
    key_id, headers = await new_key(first)
    # The creation's own announcement may arrive while the second reads the key, and then it
    # rightly declines to cache what it read; once it is in, the next read fills the cache.
    prefix = headers["Authorization"].removeprefix("Bearer ")[:PREFIX_LENGTH]

    async def cached_by_the_second() -> bool:
        assert (await second.get("/v1/operations", headers=headers)).status_code == 200
        return services_of(second).keys._cache.get(prefix) is not None

    await eventually(cached_by_the_second, within=3.0)
    # The second's first use of the key is being written in the background (`last_used_at`);
    # let it land so the direct write below does not race it for the row's version.
    flusher = services_of(second).keys._flusher
    if flusher is not None:
        await flusher
    # The second process now answers from its cache: a change nobody announces goes unseen...
    storage = services_of(first).storage
    async with storage.unit_of_work() as uow:
        key = await uow.repo(ApiKey).get(key_id)
        assert key is not None
        key.status = ApiKeyStatus.SUSPENDED
        await uow.repo(ApiKey).update(key)
        await uow.commit()
    assert (await second.get("/v1/operations", headers=headers)).status_code == 200
    # ...while a revocation through the service reaches it at once.
    revoked = await first.post(f"/admin/keys/{key_id}/revoke", headers=ADMIN)
    assert revoked.status_code == 200

    async def refused() -> bool:
        return (await second.get("/v1/operations", headers=headers)).status_code == 401

    assert await eventually(refused, within=1.0) < 1.0


async def test_a_configuration_change_reaches_the_other_process_within_a_second(
    two_processes: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    first, second = two_processes
    config = services_of(second).config
    assert await config.get("logging.log_request_bodies") is False  # cached in the second
    changed = await first.put(
        "/admin/config/logging.log_request_bodies", json={"value": True}, headers=ADMIN
    )
    assert changed.status_code == 200

    async def seen() -> bool:
        return bool(await config.get("logging.log_request_bodies"))

    assert await eventually(seen, within=1.0) < 1.0

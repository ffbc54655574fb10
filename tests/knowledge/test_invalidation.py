"""Two API processes on one PostgreSQL and one Redis: a change made through one reaches the
other's cached search matrix."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import httpx
import pytest

from app.main import create_app
from app.storage.sql import SqlStorage, make_database
from tests.conftest import truncate_all
from tests.fakes import RecordingQueue
from tests.knowledge.conftest import ADMIN, Gateway, knowledge_settings

pytestmark = [pytest.mark.postgres, pytest.mark.redis]


@pytest.fixture
async def two_processes(database_url: str, redis_url: str) -> AsyncIterator[list[Gateway]]:
    truncate_all(database_url)
    async with AsyncExitStack() as stack:
        gateways = []
        for _ in range(2):
            storage = SqlStorage(make_database(database_url, pool_size=4, max_overflow=0))
            stack.push_async_callback(storage.close)
            queue = RecordingQueue(storage)
            settings = knowledge_settings(
                STORAGE_BACKEND="postgres", DATABASE_URL=database_url, BROKER="redis",
                REDIS_URL=redis_url,
            )  # fmt: skip
            app = create_app(settings, storage=storage, queue=queue)
            await stack.enter_async_context(app.router.lifespan_context(app))
            admin = await stack.enter_async_context(
                httpx.AsyncClient(
                    transport=httpx.ASGITransport(app),
                    base_url="http://gateway",
                    headers={"Authorization": f"Bearer {ADMIN}"},
                )
            )
            gateway = Gateway(app, storage, queue, admin)
            for _ in range(150):
                if gateway.services.invalidation.subscribed:
                    break
                await asyncio.sleep(0.02)
            gateways.append(gateway)
        yield gateways


async def _titles(gateway: Gateway) -> set[str]:
    answer = await gateway.admin.post(
        "/v1/knowledge-bases/docs/search", json={"query": "penguins", "top_k": 10}
    )
    assert answer.status_code == 200, answer.text
    return {hit["title"] for hit in answer.json()["data"]}


async def _eventually(gateway: Gateway, expected: set[str], within: float = 3.0) -> None:
    deadline = time.monotonic() + within
    while (found := await _titles(gateway)) != expected:
        assert time.monotonic() < deadline, found
        await asyncio.sleep(0.05)


async def test_a_change_through_one_process_reaches_the_others_search(
    two_processes: list[Gateway],
) -> None:
    first, second = two_processes
    await first.base()
    kept = await first.document(content="penguins in the south", title="kept")
    await first.run_jobs()
    assert await _titles(first) == {"kept"}  # the first process now holds the matrix

    await second.document(content="penguins in the zoo", title="added")
    await second.run_jobs()
    await _eventually(first, {"kept", "added"})

    await second.admin.delete(f"/admin/knowledge-bases/docs/documents/{kept['id']}")
    await _eventually(first, {"added"})

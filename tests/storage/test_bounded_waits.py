"""No database call waits without bound: the server cancels a long statement, and the client gives
up on a link that went silent, answering `Unavailable` (a 503) instead of hanging."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from app.config import Settings
from app.core.errors import Unavailable
from app.main import create_app
from app.operations.entities import Operation
from app.storage.sql import CLIENT_TIMEOUT_MARGIN, SqlStorage, make_database

pytestmark = pytest.mark.postgres


class FreezableLink:
    """A TCP relay to PostgreSQL on loopback that can stop passing bytes, as a blackholed
    network does: connections stay open, nothing arrives."""

    def __init__(self) -> None:
        self.frozen = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", 5432)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                while data := await src.read(65536):
                    if self.frozen.is_set():
                        continue  # swallowed: the other side waits for ever
                    dst.write(data)
                    await dst.drain()
            dst.close()

        for task in (pump(reader, up_writer), pump(up_reader, writer)):
            self._tasks.add(asyncio.ensure_future(task))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._server is not None:
            self._server.close()


@pytest.fixture
async def link() -> AsyncIterator[FreezableLink]:
    relay = FreezableLink()
    await relay.start()
    yield relay
    await relay.close()


def _through(url: str, port: int) -> str:
    return url.replace("127.0.0.1:5432", f"127.0.0.1:{port}")


async def _backend_pid(storage: SqlStorage) -> int:
    async with storage.unit_of_work() as uow:
        (row,) = await uow._fetch("SELECT pg_backend_pid() AS pid", {}, None)
        return int(row["pid"])


async def test_a_silent_link_fails_in_bounded_time_and_the_next_call_reconnects(
    database_url: str, link: FreezableLink
) -> None:
    storage = SqlStorage(
        make_database(_through(database_url, link.port), statement_timeout=0.5, connect_timeout=1.0)
    )
    try:
        await storage.check()
        link.frozen.set()
        started = time.monotonic()
        with pytest.raises(Unavailable):
            await storage.check()
        waited = time.monotonic() - started
        assert waited < 0.5 + CLIENT_TIMEOUT_MARGIN + 1.0
        link.frozen.clear()
        await storage.check()  # the silent connection was dropped, not handed out again
    finally:
        await asyncio.wait_for(storage.close(), 10)


async def test_the_server_cancels_a_long_statement_and_the_connection_is_kept(
    database_url: str,
) -> None:
    storage = SqlStorage(make_database(database_url, statement_timeout=0.3))
    try:
        pid = await _backend_pid(storage)
        started = time.monotonic()
        with pytest.raises(Unavailable):
            async with storage.unit_of_work() as uow:
                await uow._fetch("SELECT pg_sleep(5)", {}, None)
        assert time.monotonic() - started < 2.0
        assert await _backend_pid(storage) == pid
    finally:
        await storage.close()


async def test_a_statement_timeout_in_the_url_rules_over_the_setting(database_url: str) -> None:
    url = database_url + "?options=-c%20statement_timeout%3D1234"
    database = make_database(url, statement_timeout=10.0)
    storage = SqlStorage(database)
    try:
        async with storage.unit_of_work() as uow:
            (row,) = await uow._fetch("SHOW statement_timeout", {}, None)
        assert row[0] == "1234ms"
        assert database._options["command_timeout"] == pytest.approx(1.234 + CLIENT_TIMEOUT_MARGIN)
    finally:
        await storage.close()


async def test_without_a_timeout_statements_may_run_long(database_url: str) -> None:
    storage = SqlStorage(make_database(database_url, statement_timeout=0))
    try:
        async with storage.unit_of_work() as uow:
            (row,) = await uow._fetch("SHOW statement_timeout", {}, None)
        assert row[0] == "0"
    finally:
        await storage.close()


async def test_a_client_whose_job_meets_a_silent_database_gets_a_503_to_retry_not_a_hang(
    database_url: str, link: FreezableLink
) -> None:
    admin = "gw-bounded-waits-admin-key-0123456789"
    settings = Settings(
        STORAGE_BACKEND="postgres",
        DATABASE_URL=_through(database_url, link.port),
        SECRET_KEY="test-secret-key-of-sufficient-length",
        ADMIN_API_KEY=admin,  # type: ignore[arg-type]
        DB_STATEMENT_TIMEOUT_SECONDS=0.5,
        DB_CONNECT_TIMEOUT=1.0,
        GC_SETTLE=False,
    )
    app = create_app(settings)
    headers = {"Authorization": f"Bearer {admin}"}
    body = {"model": "mock", "messages": [{"role": "user", "content": "hello"}]}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            accepted = await client.post(
                "/v1/chat/completions?async=true", json=body, headers=headers
            )
            assert accepted.status_code == 202

            link.frozen.set()
            started = time.monotonic()
            refused = await client.post(
                "/v1/chat/completions?async=true", json=body, headers=headers
            )
            waited = time.monotonic() - started

            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["type"] == "service_unavailable_error"
            assert waited < 0.5 + CLIENT_TIMEOUT_MARGIN + 1.5
            link.frozen.clear()
    # Nothing accepted was lost: the first job's row is there.
    storage = SqlStorage(make_database(database_url))
    try:
        async with storage.unit_of_work() as uow:
            assert await uow.repo(Operation).get(accepted.json()["operation_id"]) is not None
    finally:
        await storage.close()

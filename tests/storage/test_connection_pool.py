"""The PostgreSQL connection pool: callers queue for a connection when all are taken, broken,
idle and old connections are replaced or closed, and nothing handed out is ever lost."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import asyncpg
import psycopg
import pytest

from app.core.errors import Unavailable
from app.operations.entities import Operation
from app.storage.sql import Database, SqlStorage
from tests.conftest import truncate_all
from tests.storage.test_contract import op

pytestmark = pytest.mark.postgres

CLOSED_PORT_DB = "postgresql://postgres@127.0.0.1:1/x"


@pytest.fixture
async def one(database_url: str) -> AsyncIterator[Database]:
    """A database of one connection at most, that waits half a second for one."""
    database = Database(database_url, pool_size=1, max_overflow=0, connect_timeout=0.5)
    yield database
    await database.close()


async def backend_pid(database: Database) -> int:
    conn = await database.acquire()
    try:
        pid: int = await conn.fetchval("SELECT pg_backend_pid()")
        return pid
    finally:
        database.release(conn)


async def queued(database: Database) -> asyncio.Task[asyncpg.Connection]:
    """A caller that asked for a connection and is waiting for one."""
    waiting = asyncio.create_task(database.acquire())
    await asyncio.sleep(0.05)
    assert not waiting.done()
    return waiting


async def test_a_connection_given_back_is_reused_without_opening_another(one: Database) -> None:
    first = await backend_pid(one)
    assert await backend_pid(one) == first
    assert (one.pool.size, one.pool.free) == (1, 1)


async def test_a_caller_waits_for_a_connection_when_all_are_taken(one: Database) -> None:
    held = await one.acquire()
    waiting = await queued(one)
    one.release(held)
    assert await asyncio.wait_for(waiting, 1) is held
    one.release(held)
    assert one.pool.size == 1


async def test_a_caller_that_waits_too_long_is_told_the_database_is_unavailable(
    one: Database,
) -> None:
    held = await one.acquire()
    with pytest.raises(Unavailable, match="TimeoutError"):
        await one.acquire()
    one.release(held)
    assert await backend_pid(one) > 0  # the pool still works


async def test_a_caller_cancelled_as_it_is_handed_a_connection_gives_it_back(
    one: Database,
) -> None:
    held = await one.acquire()
    waiting = await queued(one)
    one.release(held)  # handed to the waiter, which is cancelled before it resumes
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert (one.pool.size, one.pool.free) == (1, 1)
    assert await backend_pid(one) > 0


async def test_a_connection_that_broke_in_use_is_replaced_by_a_new_one(one: Database) -> None:
    conn = await one.acquire()
    broken = await conn.fetchval("SELECT pg_backend_pid()")
    waiting = await queued(one)
    conn.terminate()
    one.release(conn)  # the waiter is told a slot is free and opens a connection of its own
    fresh = await asyncio.wait_for(waiting, 2)
    assert await fresh.fetchval("SELECT pg_backend_pid()") != broken
    one.release(fresh)
    assert one.pool.size == 1


async def test_connections_free_past_their_idle_lifetime_are_closed(database_url: str) -> None:
    database = Database(database_url, pool_size=2, max_overflow=0, idle_lifetime=0.2)
    try:
        first, second = await database.acquire(), await database.acquire()
        database.release(first)
        database.release(second)
        assert database.pool.size == 2
        await asyncio.sleep(0.5)
        assert (database.pool.size, database.pool.free) == (0, 0)
        assert first.is_closed() and second.is_closed()
        assert await backend_pid(database) > 0  # opened again on demand
    finally:
        await database.close()


async def test_a_failed_connect_frees_its_slot(database_url: str) -> None:
    database = Database(CLOSED_PORT_DB, pool_size=1, max_overflow=0, connect_timeout=1)
    try:
        for _ in range(2):  # the second attempt has the slot the first gave back
            with pytest.raises(Unavailable, match="unreachable"):
                await database.acquire()
        assert database.pool.size == 0
    finally:
        await database.close()


async def test_close_waits_for_connections_in_use_and_refuses_new_callers(
    one: Database,
) -> None:
    conn = await one.acquire()
    closing = asyncio.create_task(one.close())
    await asyncio.sleep(0.05)
    assert not closing.done()
    with pytest.raises(Unavailable, match="closed"):
        await one.acquire()
    one.release(conn)
    await asyncio.wait_for(closing, 2)
    assert conn.is_closed() and one.pool.size == 0


def terminate(database_url: str, pids: list[int]) -> None:
    """End these backends from another connection, waiting until they are gone; the event loop
    is blocked meanwhile, so the pool cannot have noticed."""
    with psycopg.connect(database_url, autocommit=True) as admin:
        for pid in pids:
            admin.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))


async def test_connections_whose_backends_were_terminated_are_not_handed_out_again(
    database_url: str,
) -> None:
    database = Database(database_url, pool_size=3, max_overflow=0)
    storage = SqlStorage(database)
    try:
        held = [await database.acquire() for _ in range(3)]
        terminated = [conn.get_server_pid() for conn in held]
        for conn in held:
            database.release(conn)
        terminate(database_url, terminated)

        with contextlib.suppress(Unavailable):
            await storage.check()  # may have drawn a dead connection, and said so
        await storage.check()  # the next one is healthy

        live = [await database.acquire() for _ in range(database.pool.size)]
        try:
            pids = [await conn.fetchval("SELECT pg_backend_pid()") for conn in live]
        finally:
            for conn in live:
                database.release(conn)
        assert live and not set(pids) & set(terminated)
    finally:
        await database.close()


async def test_a_connection_the_server_reports_broken_is_not_reused(one: Database) -> None:
    storage = SqlStorage(one)
    before = await backend_pid(one)
    async with storage.unit_of_work() as uow:
        with pytest.raises(Unavailable, match="ConnectionFailure"):
            await uow._fetch(
                "DO $$ BEGIN RAISE EXCEPTION 'lost' USING ERRCODE = 'connection_failure'; END $$",
                {},
                None,
            )
    assert await backend_pid(one) != before
    assert one.pool.size == 1


async def test_a_statement_timeout_keeps_the_connection(database_url: str) -> None:
    timeout = "options=-c%20statement_timeout%3D50"
    url = database_url + ("&" if "?" in database_url else "?") + timeout
    database = Database(url, pool_size=1, max_overflow=0)
    storage = SqlStorage(database)
    try:
        before = await backend_pid(database)
        async with storage.unit_of_work() as uow:
            with pytest.raises(Unavailable, match="QueryCanceled"):
                await uow._fetch("SELECT pg_sleep(1)", {}, None)
        assert await backend_pid(database) == before
    finally:
        await database.close()


async def test_a_connection_past_its_lifetime_is_closed_when_given_back(database_url: str) -> None:
    database = Database(database_url, pool_size=1, max_overflow=0, max_lifetime=0.3)
    try:
        conn = await database.acquire()
        first = conn.get_server_pid()
        database.release(conn)  # young: kept
        assert await backend_pid(database) == first
        await asyncio.sleep(0.4)
        assert await backend_pid(database) == first  # handed out once more, closed on release
        assert await backend_pid(database) != first
        assert database.pool.size == 1
    finally:
        await database.close()


async def test_without_a_lifetime_a_connection_is_kept(database_url: str) -> None:
    database = Database(database_url, pool_size=1, max_overflow=0, max_lifetime=0)
    try:
        first = await backend_pid(database)
        await asyncio.sleep(0.1)
        assert await backend_pid(database) == first
    finally:
        await database.close()


@pytest.mark.parametrize("statement_cache", [True, False])
async def test_without_the_statement_cache_no_named_statements_are_prepared(
    database_url: str, statement_cache: bool
) -> None:
    truncate_all(database_url)
    database = Database(database_url, pool_size=1, max_overflow=0, statement_cache=statement_cache)
    storage = SqlStorage(database)
    try:
        for n in range(3):
            async with storage.unit_of_work() as uow:
                await uow.repo(Operation).add(op(n))
                await uow.commit()
            async with storage.unit_of_work() as uow:
                found = await uow.repo(Operation).get(op(n).id)
                assert found is not None
                await uow.repo(Operation).update(found)
                await uow.commit()
            async with storage.unit_of_work() as uow:
                assert len((await uow.repo(Operation).find(limit=10)).items) == n + 1
        conn = await database.acquire()
        try:
            prepared = await conn.fetchval("SELECT count(*) FROM pg_prepared_statements")
        finally:
            database.release(conn)
        assert (prepared > 0) is statement_cache
    finally:
        await database.close()

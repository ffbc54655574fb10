"""The PostgreSQL backend's connections: returned on every path, closed for good, and batches
that are all or nothing even when the driver refuses a row halfway."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

from app.core.errors import InvalidInput, StaleVersion, Unavailable
from app.operations.entities import Operation
from app.storage.protocol import Append, IfNull
from app.storage.sql import SqlStorage, make_database
from tests.conftest import truncate_all
from tests.storage.test_contract import op

pytestmark = pytest.mark.postgres


@pytest.fixture
def storage(sql_storage: SqlStorage) -> SqlStorage:
    return sql_storage


async def count_rows(storage: SqlStorage) -> int:
    async with storage.unit_of_work() as uow:
        return await uow.repo(Operation).count()


async def test_units_cancelled_while_rolling_back_give_their_connection_back(
    storage: SqlStorage,
) -> None:
    class Failure(Exception):
        pass

    async def doomed(failing: asyncio.Event) -> None:
        async with storage.unit_of_work() as uow:
            await uow.repo(Operation).add(op(2))  # a transaction is open
            failing.set()
            raise Failure  # leaving the block rolls back, and is cancelled meanwhile

    for _ in range(6):  # three times the pool's size
        failing = asyncio.Event()
        task = asyncio.create_task(doomed(failing))
        await failing.wait()
        while not task.done():
            task.cancel()
            await asyncio.sleep(0)
        with pytest.raises((asyncio.CancelledError, Failure)):
            await task
    assert await asyncio.wait_for(count_rows(storage), timeout=5) == 0


async def test_a_row_the_driver_refuses_halfway_leaves_none_of_the_batch(
    storage: SqlStorage,
) -> None:
    batch = [op(n) for n in range(200)] + [op(999, attempts=2**40)]  # past the int column
    async with storage.unit_of_work() as uow:
        with pytest.raises(InvalidInput) as refused:
            await uow.repo(Operation).add_many(batch)
        assert refused.value.param == "attempts"
        with pytest.raises(RuntimeError):
            await uow.commit()  # the rows before it were sent: only a rollback is safe
    assert await count_rows(storage) == 0


async def test_a_closed_database_refuses_work_and_close_ends_even_with_a_unit_open(
    database_url: str,
) -> None:
    truncate_all(database_url)
    storage = SqlStorage(make_database(database_url, pool_size=1, max_overflow=0))
    uow = storage.unit_of_work()
    await uow.repo(Operation).get("op-0001")  # holds the only connection
    closing = asyncio.create_task(storage.close())
    await asyncio.sleep(0.05)
    await uow.rollback()  # the connection goes back to the pool being closed
    await asyncio.wait_for(closing, timeout=10)
    with pytest.raises(Unavailable):
        async with storage.unit_of_work() as later:
            await later.repo(Operation).get("op-0001")


async def test_a_json_null_written_earlier_counts_as_null_for_changes(
    storage: SqlStorage, database_url: str
) -> None:
    await _add(storage, op(1))
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE operations SET result = 'null'::jsonb WHERE id = 'op-0001'")
    async with storage.unit_of_work(autocommit=True) as uow:
        written = await uow.repo(Operation).update_where("op-0001", {"result": IfNull({"x": 1})})
    assert written is not None and written.result == {"x": 1}
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE operations SET attempt_log = 'null'::jsonb WHERE id = 'op-0001'")
    async with storage.unit_of_work(autocommit=True) as uow:
        written = await uow.repo(Operation).update_where(
            "op-0001", {"attempt_log": Append(({"worker": "w"},))}
        )
    assert written is not None and written.attempt_log == [{"worker": "w"}]


async def _add(storage: SqlStorage, operation: Operation) -> None:
    async with storage.unit_of_work() as uow:
        await uow.repo(Operation).add(operation)
        await uow.commit()


async def test_a_deadlock_is_a_stale_version_that_callers_retry(
    storage: SqlStorage,
) -> None:
    await _add(storage, op(1))
    await _add(storage, op(2))
    first, second = storage.unit_of_work(), storage.unit_of_work()
    for uow, key in ((first, "op-0001"), (second, "op-0002")):
        await uow.repo(Operation).update_where(key, {"progress": {"by": key}})

    async def cross(uow: Any, key: str) -> None:
        await uow.repo(Operation).update_where(key, {"progress": {"crossed": True}})

    outcomes = await asyncio.gather(
        cross(first, "op-0002"), cross(second, "op-0001"), return_exceptions=True
    )
    for uow in (first, second):
        await uow.rollback()
    assert sum(isinstance(o, StaleVersion) for o in outcomes) == 1, outcomes

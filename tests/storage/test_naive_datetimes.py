"""A naive datetime in a filter is read as UTC by both backends (PostgreSQL sessions run in UTC),
so a client's `start=2026-01-01T00:00:00` filters instead of failing on the memory backend."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from app.operations.entities import Operation, OperationStatus
from app.queue.names import OperationKind
from app.storage.protocol import Op, Storage, Where

NOON = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


async def test_naive_datetimes_in_filters_compare_as_utc(storage: Storage) -> None:
    async with storage.unit_of_work() as uow:
        for n in range(3):
            await uow.repo(Operation).add(
                Operation(
                    id=f"op-naive-{n}",
                    kind=OperationKind.CHAT_COMPLETION,
                    status=OperationStatus.PENDING,
                    queue="chat",
                    owner_key_id="key-naive",
                    created_at=NOON + timedelta(hours=n),
                )
            )
        await uow.commit()
    naive_one_pm = datetime(2026, 1, 1, 13, 0)
    async with storage.unit_of_work() as uow:
        repo = uow.repo(Operation)
        later = await repo.find(Where("created_at", Op.GE, naive_one_pm), order_by=["id"])
        before = await repo.count(Where("created_at", Op.LT, naive_one_pm))
        exact = await repo.count(Where("created_at", Op.EQ, naive_one_pm))
    assert [o.id for o in later.items] == ["op-naive-1", "op-naive-2"]
    assert before == 1 and exact == 1

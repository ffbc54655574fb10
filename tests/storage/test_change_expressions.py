"""Change expressions of `update_where`: the same behaviour from both storage backends.

A change may be an expression of the column's current value instead of a plain value:
`Increment` adds to an integer column, `Append` appends to a JSON list column and `IfNull` sets
a column only while it is null. Each is evaluated on the row as it is when the write happens,
so concurrent writers never lose one another's changes.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest

from app.core.errors import InvalidInput
from app.operations.entities import Operation, OperationStatus
from app.storage.protocol import Append, IfNull, Increment, Storage, Where
from tests.factories import BASE_INSTANT, comparable
from tests.storage.test_contract import add_ops, op

PENDING = OperationStatus.PENDING
RUNNING = OperationStatus.RUNNING
OP_ID = "op-0001"


async def current(storage: Storage, operation_id: str = OP_ID) -> Operation:
    async with storage.unit_of_work() as uow:
        found = await uow.repo(Operation).get(operation_id)
    assert found is not None, operation_id
    return found


async def change(
    storage: Storage, changes: dict[str, Any], *where: Where, autocommit: bool = False
) -> Operation | None:
    """`update_where` on the operation in a unit of its own, committed."""
    async with storage.unit_of_work(autocommit=autocommit) as uow:
        written = await uow.repo(Operation).update_where(OP_ID, changes, *where)
        if not autocommit:
            await uow.commit()
    return written


def entry(n: int) -> dict[str, Any]:
    """An attempt-log entry whose values span the JSON types."""
    return {
        "attempt": n,
        "worker": f"worker-{n}",
        "ok": n % 2 == 0,
        "error": None,
        "seconds": n + 0.25,
        "tags": ["retry", n],
        "detail": {"code": n, "nested": [True, None]},
    }


# ---- Increment ---------------------------------------------------------------------------


@pytest.mark.parametrize(("by", "expected"), [(1, 6), (3, 8), (-2, 3), (0, 5)])
async def test_increment_adds_to_the_current_value_and_returns_and_stores_the_sum(
    storage: Storage, by: int, expected: int
) -> None:
    await add_ops(storage, [op(1, attempts=5)])
    before = await current(storage)
    written = await change(storage, {"attempts": Increment(by)})
    assert written is not None
    assert written.attempts == expected
    assert written.version == before.version + 1
    after = await current(storage)
    assert after.attempts == expected
    assert comparable(after) == comparable(written)


async def test_increment_defaults_to_one_and_successive_increments_accumulate(
    storage: Storage,
) -> None:
    await add_ops(storage, [op(1, send_count=0)])
    for expected in (1, 2, 3):
        written = await change(storage, {"send_count": Increment()})
        assert written is not None
        assert written.send_count == expected
    assert (await current(storage)).send_count == 3


async def test_increment_leaves_the_other_integer_columns_alone(storage: Storage) -> None:
    await add_ops(storage, [op(1, attempts=2, send_count=7, max_attempts=4)])
    written = await change(storage, {"send_count": Increment(5)})
    assert written is not None
    after = await current(storage)
    assert (after.attempts, after.send_count, after.max_attempts) == (2, 12, 4)


# ---- Append ------------------------------------------------------------------------------


async def test_append_to_an_empty_list_stores_the_items_in_order(storage: Storage) -> None:
    await add_ops(storage, [op(1)])
    assert (await current(storage)).attempt_log == []
    written = await change(storage, {"attempt_log": Append((entry(1), entry(2)))})
    assert written is not None
    assert written.attempt_log == [entry(1), entry(2)]
    assert (await current(storage)).attempt_log == [entry(1), entry(2)]


async def test_append_to_a_non_empty_list_keeps_the_old_items_first(storage: Storage) -> None:
    await add_ops(storage, [op(1, attempt_log=[entry(1), entry(2)])])
    written = await change(storage, {"attempt_log": Append((entry(3), entry(4)))})
    assert written is not None
    assert written.attempt_log == [entry(1), entry(2), entry(3), entry(4)]
    await change(storage, {"attempt_log": Append((entry(5),))})
    stored = (await current(storage)).attempt_log
    assert [item["attempt"] for item in stored] == [1, 2, 3, 4, 5]
    assert stored == [entry(1), entry(2), entry(3), entry(4), entry(5)]


async def test_appended_items_keep_their_json_types(storage: Storage) -> None:
    await add_ops(storage, [op(1)])
    await change(storage, {"attempt_log": Append((entry(3),))})
    (item,) = (await current(storage)).attempt_log
    assert type(item["attempt"]) is int
    assert type(item["worker"]) is str
    assert item["ok"] is False
    assert item["error"] is None
    assert type(item["seconds"]) is float
    assert item["seconds"] == 3.25
    assert item["tags"] == ["retry", 3]
    assert type(item["tags"][1]) is int
    assert item["detail"] == {"code": 3, "nested": [True, None]}
    assert item["detail"]["nested"][0] is True


async def test_append_of_no_items_leaves_the_list_as_it_was(storage: Storage) -> None:
    await add_ops(storage, [op(1, attempt_log=[entry(1)])])
    written = await change(storage, {"attempt_log": Append(())})
    assert written is not None
    assert written.attempt_log == [entry(1)]
    assert (await current(storage)).attempt_log == [entry(1)]


# ---- IfNull ------------------------------------------------------------------------------


async def test_if_null_sets_a_null_column(storage: Storage) -> None:
    await add_ops(storage, [op(1)])
    assert (await current(storage)).started_at is None
    started = BASE_INSTANT + timedelta(minutes=1)
    written = await change(storage, {"started_at": IfNull(started)})
    assert written is not None
    assert written.started_at == started
    assert (await current(storage)).started_at == started


async def test_if_null_leaves_a_column_that_is_set_untouched(storage: Storage) -> None:
    first = BASE_INSTANT + timedelta(minutes=1)
    await add_ops(storage, [op(1, started_at=first)])
    written = await change(storage, {"started_at": IfNull(first + timedelta(hours=1))})
    assert written is not None
    assert written.started_at == first
    assert (await current(storage)).started_at == first


async def test_if_null_on_a_json_column_sets_it_only_while_it_is_null(storage: Storage) -> None:
    await add_ops(storage, [op(1)])
    await change(storage, {"result": IfNull({"first": [1, "a"]})})
    assert (await current(storage)).result == {"first": [1, "a"]}
    await change(storage, {"result": IfNull({"second": True})})
    assert (await current(storage)).result == {"first": [1, "a"]}


# ---- combined with values and conditions -------------------------------------------------


async def test_expressions_combine_with_plain_values_and_conditions_in_one_call(
    storage: Storage,
) -> None:
    await add_ops(storage, [op(1, attempts=2, attempt_log=[entry(1), entry(2)])])
    before = await current(storage)
    started = BASE_INSTANT + timedelta(minutes=3)
    written = await change(
        storage,
        {
            "status": RUNNING,
            "lease_token": "token-a",
            "attempts": Increment(1),
            "started_at": IfNull(started),
            "attempt_log": Append((entry(3),)),
            "progress": {"step": 1},
        },
        Where.eq("status", PENDING),
        Where.eq("attempts", 2),
    )
    assert written is not None
    assert written.status is RUNNING
    assert written.lease_token == "token-a"
    assert written.attempts == 3
    assert written.started_at == started
    assert written.attempt_log == [entry(1), entry(2), entry(3)]
    assert written.progress == {"step": 1}
    assert written.version == before.version + 1
    assert comparable(await current(storage)) == comparable(written)


async def test_a_condition_on_the_changed_column_sees_the_value_before_the_change(
    storage: Storage,
) -> None:
    await add_ops(storage, [op(1, attempts=2)])
    written = await change(storage, {"attempts": Increment(1)}, Where.eq("attempts", 2))
    assert written is not None
    assert written.attempts == 3
    # The same compare-and-set again no longer matches: the value it expected has moved on.
    assert await change(storage, {"attempts": Increment(1)}, Where.eq("attempts", 2)) is None
    assert (await current(storage)).attempts == 3


async def test_nothing_changes_when_a_condition_does_not_match(storage: Storage) -> None:
    await add_ops(storage, [op(1, status=RUNNING, attempts=2, attempt_log=[entry(1)])])
    before = await current(storage)
    written = await change(
        storage,
        {
            "status": RUNNING,
            "attempts": Increment(1),
            "send_count": Increment(4),
            "started_at": IfNull(BASE_INSTANT),
            "attempt_log": Append((entry(2),)),
        },
        Where.eq("status", PENDING),
    )
    assert written is None
    assert comparable(await current(storage)) == comparable(before)


async def test_expressions_on_a_missing_row_write_nothing(storage: Storage) -> None:
    await add_ops(storage, [op(2)])
    before = await current(storage, "op-0002")
    written = await change(storage, {"attempts": Increment(1), "attempt_log": Append((entry(1),))})
    assert written is None
    assert comparable(await current(storage, "op-0002")) == comparable(before)
    async with storage.unit_of_work() as uow:
        assert await uow.repo(Operation).get(OP_ID) is None


# ---- concurrency -------------------------------------------------------------------------

CONCURRENT = 20


async def test_concurrent_autocommit_increments_lose_no_increment(storage: Storage) -> None:
    await add_ops(storage, [op(1, send_count=0)])

    async def bump() -> int:
        written = await change(storage, {"send_count": Increment(1)}, autocommit=True)
        assert written is not None
        return written.send_count

    seen = await asyncio.gather(*(bump() for _ in range(CONCURRENT)))
    assert (await current(storage)).send_count == CONCURRENT
    # Each writer saw its own increment applied on top of all the earlier ones.
    assert sorted(seen) == list(range(1, CONCURRENT + 1))


async def test_concurrent_autocommit_appends_lose_no_item(storage: Storage) -> None:
    await add_ops(storage, [op(1)])

    async def append(n: int) -> int:
        written = await change(storage, {"attempt_log": Append((entry(n),))}, autocommit=True)
        assert written is not None
        return len(written.attempt_log)

    lengths = await asyncio.gather(*(append(n) for n in range(CONCURRENT)))
    stored = (await current(storage)).attempt_log
    assert sorted(item["attempt"] for item in stored) == list(range(CONCURRENT))
    assert all(item == entry(item["attempt"]) for item in stored)
    assert sorted(lengths) == list(range(1, CONCURRENT + 1))


# ---- rollback ----------------------------------------------------------------------------


async def test_expressions_in_a_rolled_back_unit_leave_nothing_behind(storage: Storage) -> None:
    await add_ops(storage, [op(1, attempts=2, attempt_log=[entry(1)])])
    before = await current(storage)
    async with storage.unit_of_work() as uow:
        written = await uow.repo(Operation).update_where(
            OP_ID,
            {
                "attempts": Increment(3),
                "send_count": Increment(1),
                "attempt_log": Append((entry(2),)),
                "started_at": IfNull(BASE_INSTANT),
            },
        )
        assert written is not None
        assert (written.attempts, written.send_count) == (5, before.send_count + 1)
        assert written.attempt_log == [entry(1), entry(2)]
        # Visible inside the unit that wrote it ...
        seen = await uow.repo(Operation).get(OP_ID)
        assert seen is not None
        assert seen.attempts == 5
        await uow.rollback()
    # ... and gone once it is rolled back.
    assert comparable(await current(storage)) == comparable(before)


async def test_expressions_in_a_unit_left_without_commit_leave_nothing_behind(
    storage: Storage,
) -> None:
    await add_ops(storage, [op(1, attempts=2)])
    before = await current(storage)
    async with storage.unit_of_work() as uow:
        await uow.repo(Operation).update_where(
            OP_ID, {"attempts": Increment(1), "attempt_log": Append((entry(1),))}
        )
    assert comparable(await current(storage)) == comparable(before)


# ---- refused changes ---------------------------------------------------------------------


@pytest.mark.parametrize("autocommit", [False, True], ids=["unit", "autocommit"])
@pytest.mark.parametrize("column", ["queue", "progress", "attempt_log", "started_at"])
async def test_increment_of_a_non_integer_column_is_refused_and_changes_nothing(
    storage: Storage, column: str, autocommit: bool
) -> None:
    await add_ops(storage, [op(1, started_at=BASE_INSTANT, progress={"step": 1})])
    before = await current(storage)
    with pytest.raises(Exception):  # noqa: B017 - the backends raise different types
        await change(storage, {column: Increment(1)}, autocommit=autocommit)
    assert comparable(await current(storage)) == comparable(before)


@pytest.mark.parametrize("autocommit", [False, True], ids=["unit", "autocommit"])
@pytest.mark.parametrize("column", ["attempts", "queue", "status", "progress"])
async def test_append_to_a_non_list_column_is_refused_and_changes_nothing(
    storage: Storage, column: str, autocommit: bool
) -> None:
    await add_ops(storage, [op(1, progress={"step": 1})])
    before = await current(storage)
    with pytest.raises(Exception):  # noqa: B017 - the backends raise different types
        await change(storage, {column: Append(("x",))}, autocommit=autocommit)
    assert comparable(await current(storage)) == comparable(before)


@pytest.mark.parametrize("autocommit", [False, True], ids=["unit", "autocommit"])
async def test_append_of_items_the_list_column_does_not_hold_is_invalid_input(
    storage: Storage, autocommit: bool
) -> None:
    # `attempt_log` holds JSON objects, as a plain value of `[1, "two"]` is refused too.
    await add_ops(storage, [op(1, attempt_log=[entry(1)])])
    before = await current(storage)
    with pytest.raises(InvalidInput) as refused:
        await change(storage, {"attempt_log": Append((1, "two"))}, autocommit=autocommit)
    assert (refused.value.param or "").startswith("attempt_log")
    assert comparable(await current(storage)) == comparable(before)


async def test_a_plain_value_the_list_column_does_not_hold_is_invalid_input(
    storage: Storage,
) -> None:
    await add_ops(storage, [op(1)])
    with pytest.raises(InvalidInput) as refused:
        await change(storage, {"attempt_log": [1, "two"]})
    assert (refused.value.param or "").startswith("attempt_log")


@pytest.mark.parametrize("autocommit", [False, True], ids=["unit", "autocommit"])
@pytest.mark.parametrize(
    ("column", "value"),
    [("started_at", "not a time"), ("started_at", [1, 2]), ("lease_token", 12.5)],
)
async def test_if_null_with_a_value_the_column_refuses_is_invalid_input_naming_it(
    storage: Storage, column: str, value: Any, autocommit: bool
) -> None:
    await add_ops(storage, [op(1)])
    before = await current(storage)
    with pytest.raises(InvalidInput) as refused:
        await change(storage, {column: IfNull(value)}, autocommit=autocommit)
    assert refused.value.param == column
    assert column in str(refused.value)
    assert comparable(await current(storage)) == comparable(before)


async def test_if_null_refuses_an_invalid_value_even_when_the_column_is_set(
    storage: Storage,
) -> None:
    await add_ops(storage, [op(1, started_at=BASE_INSTANT)])
    with pytest.raises(InvalidInput) as refused:
        await change(storage, {"started_at": IfNull("not a time")})
    assert refused.value.param == "started_at"
    assert (await current(storage)).started_at == BASE_INSTANT

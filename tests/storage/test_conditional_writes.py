"""Conditional writes and autocommit units: the same behaviour from both storage backends.

`update_where` is a compare-and-set: it writes only while every condition holds, in one step,
so of several writers racing on the same condition exactly one wins. An autocommit unit commits
each write by itself as it happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import psycopg
import pytest

from app.core.errors import DuplicateKey, InvalidInput, ReferenceViolation, StaleVersion
from app.logs.entities import ExecutionLog
from app.operations.entities import Operation, OperationStatus
from app.storage.memory import MemoryStorage
from app.storage.protocol import Increment, Storage, Where
from app.storage.sql import SqlStorage
from app.usage.entities import UsageRecord
from tests.factories import BASE_INSTANT, build, comparable
from tests.storage.test_contract import add_ops, op

PENDING = OperationStatus.PENDING
RUNNING = OperationStatus.RUNNING


async def stored(storage: Storage, operation_id: str = "op-0001") -> Operation | None:
    async with storage.unit_of_work() as uow:
        return await uow.repo(Operation).get(operation_id)


async def current(storage: Storage, operation_id: str = "op-0001") -> Operation:
    found = await stored(storage, operation_id)
    assert found is not None, operation_id
    return found


async def count(storage: Storage) -> int:
    async with storage.unit_of_work() as uow:
        return await uow.repo(Operation).count()


# ---- update_where ------------------------------------------------------------------------


async def test_update_where_writes_the_changes_and_returns_the_entity_as_stored(
    storage: Storage,
) -> None:
    await add_ops(storage, [op(1, attempts=0)])
    before = await current(storage)
    lease = BASE_INSTANT + timedelta(minutes=5)
    async with storage.unit_of_work() as uow:
        written = await uow.repo(Operation).update_where(
            "op-0001",
            {
                "status": RUNNING,
                "attempts": 1,
                "lease_token": "token-a",
                "lease_expires_at": lease,
                "progress": {"step": 2, "of": [3, "steps"]},
                "result": None,
            },
            Where.eq("status", PENDING),
        )
        await uow.commit()
    assert written is not None
    assert written.status is RUNNING
    assert (written.attempts, written.lease_token) == (1, "token-a")
    assert written.lease_expires_at == lease
    assert written.progress == {"step": 2, "of": [3, "steps"]}
    assert written.version == before.version + 1
    assert written.updated_at > before.updated_at
    assert written.created_at == before.created_at
    # Columns it was not asked to change keep their values.
    untouched = {"kind", "queue", "owner_key_id", "input", "max_attempts", "attempt_log"}
    assert {n: getattr(written, n) for n in untouched} == {n: getattr(before, n) for n in untouched}
    fresh = await current(storage)
    assert comparable(fresh) == comparable(written)
    for name, value in comparable(fresh).items():
        assert type(value) is type(getattr(written, name)), name


async def test_update_where_that_does_not_match_returns_none_and_changes_nothing(
    storage: Storage,
) -> None:
    await add_ops(storage, [op(1)])
    before = await current(storage)
    async with storage.unit_of_work() as uow:
        written = await uow.repo(Operation).update_where(
            "op-0001", {"status": RUNNING, "attempts": 4}, Where.eq("status", RUNNING)
        )
        await uow.commit()
    assert written is None
    assert comparable(await current(storage)) == comparable(before)


async def test_update_where_of_a_missing_entity_returns_none_and_creates_nothing(
    storage: Storage,
) -> None:
    async with storage.unit_of_work(autocommit=True) as uow:
        assert await uow.repo(Operation).update_where("op-9999", {"attempts": 4}) is None
        assert (
            await uow.repo(Operation).update_where(
                "op-9999", {"attempts": 4}, Where.eq("status", PENDING)
            )
            is None
        )
    assert await stored(storage, "op-9999") is None
    assert await count(storage) == 0


async def test_update_where_without_conditions_updates_an_existing_entity(
    storage: Storage,
) -> None:
    await add_ops(storage, [op(1, attempts=0)])
    async with storage.unit_of_work(autocommit=True) as uow:
        written = await uow.repo(Operation).update_where("op-0001", {"attempts": 2})
    assert written is not None and written.attempts == 2 and written.version == 2


async def test_a_compare_and_set_succeeds_once_then_no_longer_matches(storage: Storage) -> None:
    await add_ops(storage, [op(1)])
    async with storage.unit_of_work(autocommit=True) as uow:
        repo = uow.repo(Operation)
        first = await repo.update_where(
            "op-0001", {"status": RUNNING, "lease_token": "a"}, Where.eq("status", PENDING)
        )
        second = await repo.update_where(
            "op-0001", {"status": RUNNING, "lease_token": "b"}, Where.eq("status", PENDING)
        )
    assert first is not None and first.lease_token == "a"
    assert second is None
    after = await current(storage)
    assert after.lease_token == "a" and after.version == 2


async def test_write_where_says_whether_it_wrote_and_writes_what_update_where_would(
    storage: Storage,
) -> None:
    await add_ops(storage, [op(1, attempts=0), op(2, attempts=0)])
    async with storage.unit_of_work(autocommit=True) as uow:
        repo = uow.repo(Operation)
        assert await repo.write_where(
            "op-0001",
            {"status": RUNNING, "lease_token": "a", "attempts": Increment(1)},
            Where.eq("status", PENDING),
        )
        assert not await repo.write_where(
            "op-0001", {"status": RUNNING, "lease_token": "b"}, Where.eq("status", PENDING)
        )
        assert not await repo.write_where("op-9999", {"attempts": 3})
        expected = await repo.update_where(
            "op-0002",
            {"status": RUNNING, "lease_token": "a", "attempts": Increment(1)},
            Where.eq("status", PENDING),
        )
    written = await current(storage)
    assert expected is not None
    assert (written.status, written.lease_token, written.attempts) == (RUNNING, "a", 1)
    assert written.version == expected.version == 2
    assert await stored(storage, "op-9999") is None


async def test_write_where_checks_its_changes_like_update_where(storage: Storage) -> None:
    await add_ops(storage, [op(1)])
    async with storage.unit_of_work(autocommit=True) as uow:
        with pytest.raises(InvalidInput) as refused:
            await uow.repo(Operation).write_where("op-0001", {"attempts": "many"})
    assert refused.value.param == "attempts"
    assert (await current(storage)).version == 1


async def test_only_the_named_entity_is_written(storage: Storage) -> None:
    await add_ops(storage, [op(1), op(2)])
    other = await current(storage, "op-0002")
    async with storage.unit_of_work(autocommit=True) as uow:
        written = await uow.repo(Operation).update_where(
            "op-0001", {"status": RUNNING}, Where.eq("status", PENDING)
        )
    assert written is not None and written.id == "op-0001"
    assert comparable(await current(storage, "op-0002")) == comparable(other)


# Each pair: a condition the row below meets, and one of the same kind it does not.
LEASED_AT = BASE_INSTANT + timedelta(hours=1)
CONDITIONS: dict[str, tuple[list[Where], list[Where]]] = {
    "eq": ([Where.eq("owner_key_id", "key-a")], [Where.eq("owner_key_id", "key-b")]),
    "eq-enum": ([Where.eq("status", PENDING)], [Where.eq("status", RUNNING)]),
    "eq-enum-value": ([Where.eq("status", "pending")], [Where.eq("status", "running")]),
    "ne": ([Where.ne("status", RUNNING)], [Where.ne("status", PENDING)]),
    "ne-on-null": ([Where.is_null("lease_token")], [Where.ne("lease_token", "other")]),
    "lt": ([Where.lt("attempts", 3)], [Where.lt("attempts", 2)]),
    "le": ([Where.le("attempts", 2)], [Where.le("attempts", 1)]),
    "gt": ([Where.gt("attempts", 1)], [Where.gt("attempts", 2)]),
    "ge": ([Where.ge("attempts", 2)], [Where.ge("attempts", 3)]),
    "in": ([Where.in_("status", [PENDING, RUNNING])], [Where.in_("status", [RUNNING, "failed"])]),
    "in-empty": ([Where.in_("owner_key_id", ["key-a"])], [Where.in_("owner_key_id", [])]),
    "is-null": ([Where.is_null("lease_token")], [Where.is_null("lease_token", False)]),
    "is-not-null": (
        [Where.is_null("lease_expires_at", False)],
        [Where.is_null("lease_expires_at")],
    ),
    "instant-lt": (
        [Where.lt("lease_expires_at", LEASED_AT + timedelta(microseconds=1))],
        [Where.lt("lease_expires_at", LEASED_AT)],
    ),
    "instant-ge": (
        [Where.ge("lease_expires_at", LEASED_AT)],
        [Where.gt("lease_expires_at", LEASED_AT)],
    ),
    "all-of-several": (
        [Where.eq("status", PENDING), Where.eq("attempts", 2), Where.is_null("lease_token")],
        [Where.eq("status", PENDING), Where.eq("attempts", 3), Where.is_null("lease_token")],
    ),
}


@pytest.mark.parametrize(("matching", "missing"), CONDITIONS.values(), ids=CONDITIONS.keys())
async def test_each_kind_of_condition_decides_whether_the_write_happens(
    storage: Storage, matching: list[Where], missing: list[Where]
) -> None:
    await add_ops(
        storage,
        [op(1, owner_key_id="key-a", attempts=2, lease_token=None, lease_expires_at=LEASED_AT)],
    )
    before = await current(storage)
    async with storage.unit_of_work(autocommit=True) as uow:
        refused = await uow.repo(Operation).update_where("op-0001", {"attempts": 9}, *missing)
    assert refused is None
    assert comparable(await current(storage)) == comparable(before)
    async with storage.unit_of_work(autocommit=True) as uow:
        written = await uow.repo(Operation).update_where("op-0001", {"attempts": 9}, *matching)
    assert written is not None and written.attempts == 9 and written.version == 2
    assert (await current(storage)).attempts == 9


async def test_a_condition_on_the_key_of_another_row_does_not_match(storage: Storage) -> None:
    await add_ops(storage, [op(1), op(2)])
    async with storage.unit_of_work(autocommit=True) as uow:
        written = await uow.repo(Operation).update_where(
            "op-0001", {"attempts": 4}, Where.eq("id", "op-0002")
        )
    assert written is None
    assert (await current(storage)).version == 1


async def test_a_comparison_on_a_json_column_is_refused(storage: Storage) -> None:
    await add_ops(storage, [op(1)])
    async with storage.unit_of_work(autocommit=True) as uow:
        with pytest.raises(ValueError, match="input"):
            await uow.repo(Operation).update_where(
                "op-0001", {"attempts": 4}, Where.eq("input", {})
            )
    assert (await current(storage)).version == 1


async def test_is_null_on_a_json_column_tells_an_absent_value_from_a_present_one(
    storage: Storage,
) -> None:
    await add_ops(storage, [op(1, result=None), op(2, result={"answer": 42})])
    async with storage.unit_of_work(autocommit=True) as uow:
        repo = uow.repo(Operation)
        absent = await repo.update_where("op-0001", {"attempts": 4}, Where.is_null("result"))
        present = await repo.update_where(
            "op-0002", {"attempts": 4}, Where.is_null("result", False)
        )
        neither = await repo.update_where("op-0002", {"attempts": 5}, Where.is_null("result"))
    assert absent is not None and absent.attempts == 4
    assert present is not None and present.attempts == 4
    assert neither is None


INVALID_CHANGES: dict[str, tuple[dict[str, Any], str]] = {
    "unknown-status": ({"status": "exploded"}, "status"),
    "not-a-number": ({"attempts": "many"}, "attempts"),
    "too-long": ({"lease_token": "x" * 65}, "lease_token"),
    "null-in-required": ({"queue": None}, "queue"),
    "not-an-instant": ({"lease_expires_at": "soon-ish"}, "lease_expires_at"),
    "list-for-object": ({"progress": [1, 2]}, "progress"),
    "one-bad-of-several": ({"attempts": 2, "kind": "nonsense"}, "kind"),
}


@pytest.mark.parametrize(("changes", "param"), INVALID_CHANGES.values(), ids=INVALID_CHANGES.keys())
async def test_an_invalid_change_is_invalid_input_naming_the_column(
    storage: Storage, changes: dict[str, Any], param: str
) -> None:
    await add_ops(storage, [op(1)])
    before = await current(storage)
    async with storage.unit_of_work(autocommit=True) as uow:
        with pytest.raises(InvalidInput) as refused:
            await uow.repo(Operation).update_where("op-0001", changes, Where.eq("status", PENDING))
    assert refused.value.param == param
    assert comparable(await current(storage)) == comparable(before)


async def test_a_change_that_is_not_json_is_invalid_input(storage: Storage) -> None:
    await add_ops(storage, [op(1)])
    before = await current(storage)
    async with storage.unit_of_work(autocommit=True) as uow:
        with pytest.raises(InvalidInput):
            await uow.repo(Operation).update_where("op-0001", {"result": {"when": object()}})
    assert comparable(await current(storage)) == comparable(before)


async def test_changes_are_validated_even_when_the_entity_does_not_match(
    storage: Storage,
) -> None:
    # A whole-entity write validates the entity before it looks at what is stored.
    await add_ops(storage, [op(1)])
    async with storage.unit_of_work(autocommit=True) as uow:
        repo = uow.repo(Operation)
        with pytest.raises(InvalidInput) as no_match:
            await repo.update_where("op-0001", {"status": "exploded"}, Where.eq("status", RUNNING))
        with pytest.raises(InvalidInput) as missing:
            await repo.update_where("op-9999", {"status": "exploded"})
        with pytest.raises(ValueError, match="colour"):
            await repo.update_where("op-9999", {"colour": "red"})
    assert no_match.value.param == missing.value.param == "status"


async def test_an_unknown_column_in_the_changes_or_a_condition_is_a_value_error(
    storage: Storage,
) -> None:
    await add_ops(storage, [op(1)])
    async with storage.unit_of_work(autocommit=True) as uow:
        repo = uow.repo(Operation)
        with pytest.raises(ValueError, match="colour"):
            await repo.update_where("op-0001", {"colour": "red"}, Where.eq("status", PENDING))
        with pytest.raises(ValueError, match="colour"):
            await repo.update_where("op-0001", {"attempts": 4}, Where.eq("colour", "red"))
    assert (await current(storage)).version == 1


@pytest.mark.parametrize("column", ["id", "created_at", "updated_at", "version"])
async def test_the_key_and_the_columns_storage_keeps_cannot_be_changed(
    storage: Storage, column: str
) -> None:
    await add_ops(storage, [op(1)])
    before = await current(storage)
    value: Any = {
        "id": "op-9999",
        "created_at": BASE_INSTANT + timedelta(days=30),
        "updated_at": BASE_INSTANT + timedelta(days=30),
        "version": 50,
    }[column]
    async with storage.unit_of_work(autocommit=True) as uow:
        with pytest.raises(ValueError, match=column):
            await uow.repo(Operation).update_where("op-0001", {"attempts": 4, column: value})
    assert await current(storage) == before


async def test_a_change_taking_a_unique_key_is_a_conflict_and_changes_nothing(
    storage: Storage,
) -> None:
    await add_ops(
        storage,
        [op(1, owner_key_id="key-a", idempotency_key="k1"), op(2, owner_key_id="key-a")],
    )
    before = await current(storage, "op-0002")
    async with storage.unit_of_work(autocommit=True) as uow:
        with pytest.raises(DuplicateKey):
            await uow.repo(Operation).update_where("op-0002", {"idempotency_key": "k1"})
    assert comparable(await current(storage, "op-0002")) == comparable(before)


async def test_a_change_to_a_missing_parent_is_a_reference_violation(storage: Storage) -> None:
    await add_ops(storage, [op(1)])
    async with storage.unit_of_work(autocommit=True) as uow:
        with pytest.raises(ReferenceViolation):
            await uow.repo(Operation).update_where("op-0001", {"parent_id": "op-9999"})
    assert (await current(storage)).parent_id is None


async def test_update_where_bumps_the_version_so_a_stale_whole_entity_update_is_refused(
    storage: Storage,
) -> None:
    await add_ops(storage, [op(1)])
    async with storage.unit_of_work() as uow:
        read = await uow.repo(Operation).get("op-0001")
        assert read is not None
        async with storage.unit_of_work(autocommit=True) as other:
            assert await other.repo(Operation).update_where("op-0001", {"attempts": 4})
        read.error_message = "based on version 1"
        with pytest.raises(StaleVersion):
            await uow.repo(Operation).update(read)
    after = await current(storage)
    assert after.attempts == 4 and after.error_message != "based on version 1"


# ---- racing writers ----------------------------------------------------------------------


async def test_concurrent_compare_and_sets_let_exactly_one_win(storage: Storage) -> None:
    await add_ops(storage, [op(1)])
    claimers = 8
    ready: list[int] = []
    all_ready = asyncio.Event()

    async def claim(n: int) -> Operation | None:
        async with storage.unit_of_work(autocommit=True) as uow:
            repo = uow.repo(Operation)
            seen = await repo.get("op-0001")  # each holds its own connection from here
            assert seen is not None and seen.status is PENDING
            ready.append(n)
            if len(ready) == claimers:
                all_ready.set()
            await all_ready.wait()
            return await repo.update_where(
                "op-0001",
                {"status": RUNNING, "lease_token": f"token-{n}"},
                Where.eq("status", PENDING),
            )

    outcomes = await asyncio.gather(*(claim(n) for n in range(claimers)))
    winners = [o for o in outcomes if o is not None]
    assert len(winners) == 1
    final = await current(storage)
    assert final.status is RUNNING
    assert final.lease_token == winners[0].lease_token
    assert final.version == 2


async def test_concurrent_claims_of_many_rows_claim_each_row_exactly_once(
    storage: Storage,
) -> None:
    rows = 10
    await add_ops(storage, [op(n, attempts=0) for n in range(1, rows + 1)])

    async def claimer(worker: int) -> list[str]:
        won: list[str] = []
        for n in range(1, rows + 1):
            async with storage.unit_of_work(autocommit=True) as uow:
                written = await uow.repo(Operation).update_where(
                    f"op-{n:04d}",
                    {"status": RUNNING, "lease_owner": f"worker-{worker}", "attempts": 1},
                    Where.eq("status", PENDING),
                    Where.eq("attempts", 0),
                )
            if written is not None:
                won.append(written.id)
            await asyncio.sleep(0)
        return won

    results = await asyncio.gather(*(claimer(w) for w in range(4)))
    claimed = sorted(i for won in results for i in won)
    assert claimed == [f"op-{n:04d}" for n in range(1, rows + 1)]
    async with storage.unit_of_work() as uow:
        page = await uow.repo(Operation).find(order_by=["id"])
    for worker, won in enumerate(results):
        for item in page.items:
            if item.id in won:
                assert item.lease_owner == f"worker-{worker}"
    assert {(o.status, o.attempts, o.version) for o in page.items} == {(RUNNING, 1, 2)}


async def test_racing_normal_units_commit_at_most_one_conditional_write(storage: Storage) -> None:
    # A normal unit's conditional write is decided either at the write (the database waits for
    # the first writer's commit, then the condition no longer holds) or at commit (a version
    # that moved meanwhile): never both writers win.
    await add_ops(storage, [op(1)])

    async def claim(n: int) -> Operation | None:
        async with storage.unit_of_work() as uow:
            written = await uow.repo(Operation).update_where(
                "op-0001", {"status": RUNNING, "lease_token": f"t{n}"}, Where.eq("status", PENDING)
            )
            await uow.commit()
        return written

    outcomes = await asyncio.gather(claim(1), claim(2), return_exceptions=True)
    winners = [o for o in outcomes if isinstance(o, Operation)]
    losers = [o for o in outcomes if not isinstance(o, Operation)]
    assert len(winners) == 1 and len(losers) == 1
    assert losers[0] is None or isinstance(losers[0], StaleVersion)
    final = await current(storage)
    assert final.lease_token == winners[0].lease_token and final.version == 2


def test_memory_backend_threads_claiming_at_once_claim_each_row_exactly_once() -> None:
    storage = MemoryStorage()
    rows, threads_count = 30, 8
    asyncio.run(add_ops(storage, [op(n) for n in range(1, rows + 1)]))
    start = threading.Barrier(threads_count)
    won: dict[int, list[str]] = {}
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        async def run() -> list[str]:
            mine: list[str] = []
            for n in range(1, rows + 1):
                async with storage.unit_of_work(autocommit=True) as uow:
                    written = await uow.repo(Operation).update_where(
                        f"op-{n:04d}",
                        {"status": RUNNING, "lease_owner": f"thread-{t}"},
                        Where.eq("status", PENDING),
                    )
                if written is not None:
                    mine.append(written.id)
            return mine

        try:
            start.wait()
            won[t] = asyncio.run(run())
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    claimed = sorted(i for ids in won.values() for i in ids)
    assert claimed == [f"op-{n:04d}" for n in range(1, rows + 1)]

    async def owners() -> dict[str, tuple[str | None, int]]:
        async with storage.unit_of_work() as uow:
            page = await uow.repo(Operation).find(order_by=["id"])
        return {o.id: (o.lease_owner, o.version) for o in page.items}

    expected = {i: (f"thread-{t}", 2) for t, ids in won.items() for i in ids}
    assert asyncio.run(owners()) == expected


# ---- update_where inside a normal unit ---------------------------------------------------


async def test_update_where_in_a_normal_unit_is_rolled_back_with_it(storage: Storage) -> None:
    await add_ops(storage, [op(1)])
    before = await current(storage)
    async with storage.unit_of_work() as uow:
        repo = uow.repo(Operation)
        written = await repo.update_where(
            "op-0001", {"status": RUNNING}, Where.eq("status", PENDING)
        )
        assert written is not None
        mine = await repo.get("op-0001")  # the unit reads its own write
        assert mine is not None and mine.status is RUNNING and mine.version == 2
        await uow.repo(Operation).add(op(2))
        await uow.rollback()
    assert comparable(await current(storage)) == comparable(before)
    assert await count(storage) == 1


async def test_update_where_in_a_unit_left_without_commit_leaves_nothing(
    storage: Storage,
) -> None:
    await add_ops(storage, [op(1)])
    before = await current(storage)
    async with storage.unit_of_work() as uow:
        assert await uow.repo(Operation).update_where("op-0001", {"attempts": 4})
    assert comparable(await current(storage)) == comparable(before)


async def test_update_where_in_a_normal_unit_is_invisible_to_others_until_commit(
    storage: Storage,
) -> None:
    await add_ops(storage, [op(1)])
    async with storage.unit_of_work() as uow:
        await uow.repo(Operation).add(op(2))
        written = await uow.repo(Operation).update_where(
            "op-0001", {"status": RUNNING}, Where.eq("status", PENDING)
        )
        assert written is not None
        async with storage.unit_of_work() as reader:
            seen = await reader.repo(Operation).get("op-0001")
            assert seen is not None and seen.status is PENDING and seen.version == 1
            assert await reader.repo(Operation).get("op-0002") is None
        await uow.commit()
    after = await current(storage)
    assert after.status is RUNNING and after.version == 2
    assert await stored(storage, "op-0002") is not None


async def test_update_where_sees_the_units_own_earlier_writes(storage: Storage) -> None:
    async with storage.unit_of_work() as uow:
        repo = uow.repo(Operation)
        await repo.add(op(1))
        assert (
            await repo.update_where("op-0001", {"attempts": 4}, Where.eq("status", RUNNING)) is None
        )
        written = await repo.update_where("op-0001", {"attempts": 4}, Where.eq("status", PENDING))
        assert written is not None and written.version == 2
        await uow.commit()
    assert (await current(storage)).attempts == 4


# ---- autocommit units --------------------------------------------------------------------


async def test_an_autocommit_units_writes_are_visible_to_others_before_it_commits(
    storage: Storage,
) -> None:
    await add_ops(storage, [op(1), op(3)])
    async with storage.unit_of_work(autocommit=True) as uow:
        repo = uow.repo(Operation)
        await repo.add(op(2))
        assert await stored(storage, "op-0002") is not None
        assert await repo.update_where("op-0001", {"status": RUNNING}, Where.eq("status", PENDING))
        seen = await current(storage)
        assert seen.status is RUNNING and seen.version == 2
        changed = await current(storage, "op-0003")
        changed.attempts = 4
        await repo.update(changed)
        assert (await current(storage, "op-0003")).attempts == 4
        assert await repo.delete("op-0002")
        assert await stored(storage, "op-0002") is None
        assert await repo.delete_where(Where.eq("id", "op-0003")) == 1
        assert await stored(storage, "op-0003") is None
        await uow.commit()
    assert await count(storage) == 1


async def test_rolling_back_an_autocommit_unit_undoes_nothing(storage: Storage) -> None:
    await add_ops(storage, [op(1)])
    async with storage.unit_of_work(autocommit=True) as uow:
        await uow.repo(Operation).add(op(2))
        assert await uow.repo(Operation).update_where("op-0001", {"attempts": 4})
        await uow.rollback()
    async with storage.unit_of_work(autocommit=True) as uow:
        await uow.repo(Operation).add(op(3))
        # left without commit
    assert (await current(storage)).attempts == 4
    assert await stored(storage, "op-0002") is not None
    assert await stored(storage, "op-0003") is not None


async def test_an_autocommit_unit_stays_usable_after_a_failed_write(storage: Storage) -> None:
    await add_ops(storage, [op(1)])
    async with storage.unit_of_work(autocommit=True) as uow:
        repo = uow.repo(Operation)
        with pytest.raises(DuplicateKey):
            await repo.add(op(1))
        await repo.add(op(2))
        with pytest.raises(ReferenceViolation):
            await repo.add(op(3, parent_id="op-9999"))
        written = await repo.update_where(
            "op-0001", {"status": RUNNING}, Where.eq("status", PENDING)
        )
        assert written is not None
        with pytest.raises(InvalidInput):
            await repo.update_where("op-0001", {"status": "exploded"})
        assert await repo.count() == 2
        await uow.commit()
    assert await stored(storage, "op-0002") is not None
    assert await stored(storage, "op-0003") is None
    after = await current(storage)
    assert after.status is RUNNING and after.version == 2


async def test_an_autocommit_units_failed_write_leaves_nothing_behind(storage: Storage) -> None:
    await add_ops(storage, [op(1, owner_key_id="key-a", idempotency_key="k1")])
    async with storage.unit_of_work(autocommit=True) as uow:
        with pytest.raises(DuplicateKey):
            await uow.repo(Operation).add(op(2, owner_key_id="key-a", idempotency_key="k1"))
        await uow.commit()
    assert await stored(storage, "op-0002") is None
    assert await count(storage) == 1


async def test_an_autocommit_unit_reads_what_others_committed_meanwhile(
    storage: Storage,
) -> None:
    await add_ops(storage, [op(1)])
    async with storage.unit_of_work(autocommit=True) as uow:
        repo = uow.repo(Operation)
        assert await repo.count() == 1
        await add_ops(storage, [op(2)])
        assert await repo.count() == 2
        async with storage.unit_of_work(autocommit=True) as other:
            assert await other.repo(Operation).update_where("op-0001", {"status": RUNNING})
        # The condition is checked against the other unit's committed write.
        assert (
            await repo.update_where("op-0001", {"attempts": 4}, Where.eq("status", PENDING)) is None
        )


async def test_an_autocommit_units_callbacks_run_on_commit_only(storage: Storage) -> None:
    ran: list[str] = []

    async def async_callback() -> None:
        ran.append("async")

    async with storage.unit_of_work(autocommit=True) as uow:
        await uow.repo(Operation).add(op(1))
        uow.on_commit(lambda: ran.append("sync"))
        uow.on_commit(async_callback)
        assert await uow.repo(Operation).update_where("op-0001", {"attempts": 4})
        assert ran == []
        await uow.commit()
    assert ran == ["sync", "async"]
    async with storage.unit_of_work(autocommit=True) as uow:
        await uow.repo(Operation).add(op(2))
        uow.on_commit(lambda: ran.append("rolled-back"))
        await uow.rollback()
    async with storage.unit_of_work(autocommit=True) as uow:
        await uow.repo(Operation).add(op(3))
        uow.on_commit(lambda: ran.append("left"))
    assert ran == ["sync", "async"]
    assert await count(storage) == 3


async def test_a_finished_autocommit_unit_refuses_more_work(storage: Storage) -> None:
    async with storage.unit_of_work(autocommit=True) as uow:
        await uow.repo(Operation).add(op(1))
        await uow.commit()
        with pytest.raises(RuntimeError):
            await uow.repo(Operation).add(op(2))
    assert await count(storage) == 1


async def test_a_normal_unit_still_fails_whole_after_a_constraint(storage: Storage) -> None:
    await add_ops(storage, [op(1)])
    async with storage.unit_of_work() as uow:
        await uow.repo(Operation).add(op(2))
        with pytest.raises(DuplicateKey):
            await uow.repo(Operation).add(op(1))
        with pytest.raises(RuntimeError):
            await uow.repo(Operation).update_where("op-0001", {"attempts": 4})
    assert await stored(storage, "op-0002") is None
    assert (await current(storage)).version == 1


# ---- PostgreSQL only: NUL characters -----------------------------------------------------


@pytest.fixture
def postgres(sql_storage: SqlStorage) -> SqlStorage:
    return sql_storage


@pytest.mark.postgres
async def test_a_nul_in_a_change_or_a_condition_is_invalid_input_naming_the_column(
    postgres: SqlStorage,
) -> None:
    await add_ops(postgres, [op(1)])
    async with postgres.unit_of_work(autocommit=True) as uow:
        repo = uow.repo(Operation)
        with pytest.raises(InvalidInput) as in_change:
            await repo.update_where("op-0001", {"error_message": "a\x00b"})
        with pytest.raises(InvalidInput) as in_condition:
            await repo.update_where(
                "op-0001", {"attempts": 4}, Where.eq("owner_key_id", "key-\x00")
            )
    assert in_change.value.param == "error_message"
    assert in_condition.value.param == "owner_key_id"
    assert (await current(postgres)).version == 1


# ---- add_many ------------------------------------------------------------------------------


def record(n: int, **overrides: Any) -> UsageRecord:
    return build(UsageRecord, id=f"usage-{n:04d}", **overrides)


def log(n: int, **overrides: Any) -> ExecutionLog:
    return build(ExecutionLog, id=f"log-{n:04d}", **overrides)


async def snapshot(storage: Storage) -> dict[str, dict[str, Any]]:
    """Every stored operation's columns, by id."""
    async with storage.unit_of_work() as uow:
        page = await uow.repo(Operation).find()
    return {o.id: comparable(o) for o in page.items}


async def usage_ids(storage: Storage) -> list[str]:
    async with storage.unit_of_work() as uow:
        page = await uow.repo(UsageRecord).find()
    return [r.id for r in page.items]


async def test_add_many_stores_every_entity_as_a_fresh_get_reads_it_and_says_how_many(
    storage: Storage,
) -> None:
    operations = [
        op(1, result={"answer": [1, 2.5, None]}, progress={"step": 1}, lease_token="t"),
        op(2, result=None, owner_key_id="key-a", idempotency_key="k2"),
        op(3, result="text", attempt_log=[{"n": 1}], lease_expires_at=BASE_INSTANT),
    ]
    records = [record(1), record(2, model_id=None, cost_micros=2**40)]
    async with storage.unit_of_work() as uow:
        assert await uow.repo(Operation).add_many(operations) == 3
        assert await uow.repo(UsageRecord).add_many(records) == 2
        await uow.commit()
    async with storage.unit_of_work() as uow:
        fresh = await uow.repo(Operation).get_many([o.id for o in operations])
        fresh_records = await uow.repo(UsageRecord).get_many([r.id for r in records])
    read: list[Operation | UsageRecord] = [*fresh, *fresh_records]
    given: list[Operation | UsageRecord] = [*operations, *records]
    assert len(read) == 5
    for again, original in zip(read, given, strict=True):
        assert comparable(again) == comparable(original)
        for name, value in comparable(again).items():
            assert type(value) is type(getattr(original, name)), name


async def test_what_add_many_was_given_stays_the_callers(storage: Storage) -> None:
    given = op(1, input={"messages": [{"role": "user"}]}, result={"tags": ["a"]})
    async with storage.unit_of_work() as uow:
        await uow.repo(Operation).add_many([given])
        given.input["messages"].append({"role": "caller"})
        given.result["tags"].append("caller")
        given.attempts = 99
        await uow.commit()
    after = await current(storage)
    assert after.input == {"messages": [{"role": "user"}]}
    assert after.result == {"tags": ["a"]}
    assert after.attempts == 1


async def test_add_many_in_a_normal_unit_is_invisible_to_others_until_commit(
    storage: Storage,
) -> None:
    await add_ops(storage, [op(1)])
    async with storage.unit_of_work() as uow:
        await uow.repo(Operation).add_many([op(2), op(3)])
        await uow.repo(UsageRecord).add_many([record(1)])
        assert await uow.repo(Operation).count() == 3  # the unit sees its own batch
        assert await count(storage) == 1
        assert await stored(storage, "op-0002") is None
        assert await usage_ids(storage) == []
        await uow.commit()
    assert sorted(await snapshot(storage)) == ["op-0001", "op-0002", "op-0003"]
    assert await usage_ids(storage) == ["usage-0001"]


@pytest.mark.parametrize("ending", ["rollback", "left-without-commit"])
async def test_a_unit_ended_without_commit_discards_every_batch_it_added(
    storage: Storage, ending: str
) -> None:
    await add_ops(storage, [op(1)])
    before = await snapshot(storage)
    async with storage.unit_of_work() as uow:
        await uow.repo(Operation).add_many([op(2), op(3)])
        await uow.repo(UsageRecord).add_many([record(1), record(2)])
        if ending == "rollback":
            await uow.rollback()
    assert await snapshot(storage) == before
    assert await usage_ids(storage) == []


def _taken_key() -> tuple[list[Operation], list[Operation]]:
    return [op(1)], [op(2), op(1, attempts=4), op(3)]


def _taken_key_first() -> tuple[list[Operation], list[Operation]]:
    return [op(2)], [op(2, attempts=4), op(3), op(4)]


def _key_twice_in_the_batch() -> tuple[list[Operation], list[Operation]]:
    return [], [op(2), op(3), op(2, attempts=4)]


def _taken_unique_key() -> tuple[list[Operation], list[Operation]]:
    first = op(1, owner_key_id="key-a", idempotency_key="k1")
    return [first], [op(2), op(3, owner_key_id="key-a", idempotency_key="k1"), op(4)]


def _unique_key_twice_in_the_batch() -> tuple[list[Operation], list[Operation]]:
    return [], [
        op(2, owner_key_id="key-a", idempotency_key="k1"),
        op(3),
        op(4, owner_key_id="key-a", idempotency_key="k1"),
    ]


Batches = Callable[[], tuple[list[Operation], list[Operation]]]

DUPLICATE_BATCHES: dict[str, Batches] = {
    "taken-key": _taken_key,
    "taken-key-first": _taken_key_first,
    "key-twice-in-the-batch": _key_twice_in_the_batch,
    "taken-unique-key": _taken_unique_key,
    "unique-key-twice-in-the-batch": _unique_key_twice_in_the_batch,
}


@pytest.mark.parametrize("make", DUPLICATE_BATCHES.values(), ids=DUPLICATE_BATCHES.keys())
async def test_a_batch_with_a_taken_key_is_a_conflict_and_none_of_it_is_stored(
    storage: Storage, make: Batches
) -> None:
    existing, batch = make()
    await add_ops(storage, existing)
    before = await snapshot(storage)
    async with storage.unit_of_work() as uow:
        await uow.repo(UsageRecord).add_many([record(1)])
        with pytest.raises(DuplicateKey):
            await uow.repo(Operation).add_many(batch)
        with pytest.raises(RuntimeError):  # the unit can only be rolled back now
            await uow.repo(Operation).count()
        await uow.rollback()
    assert await snapshot(storage) == before
    assert await usage_ids(storage) == []


@pytest.mark.parametrize("make", DUPLICATE_BATCHES.values(), ids=DUPLICATE_BATCHES.keys())
async def test_an_autocommit_batch_with_a_taken_key_stores_none_of_it_and_the_unit_goes_on(
    storage: Storage, make: Batches
) -> None:
    existing, batch = make()
    await add_ops(storage, existing)
    before = await snapshot(storage)
    async with storage.unit_of_work(autocommit=True) as uow:
        repo = uow.repo(Operation)
        with pytest.raises(DuplicateKey):
            await repo.add_many(batch)
        assert await snapshot(storage) == before
        assert await repo.count() == len(existing)
        assert await repo.add_many([op(7), op(8)]) == 2
        # Committed as it happened: others see the batch before the unit ends.
        assert sorted(await snapshot(storage)) == sorted([*before, "op-0007", "op-0008"])
    assert sorted(await snapshot(storage)) == sorted([*before, "op-0007", "op-0008"])


@pytest.mark.parametrize("autocommit", [False, True], ids=["normal", "autocommit"])
async def test_add_many_of_nothing_returns_zero_and_writes_nothing(
    storage: Storage, autocommit: bool
) -> None:
    await add_ops(storage, [op(1)])
    before = await snapshot(storage)
    async with storage.unit_of_work(autocommit=autocommit) as uow:
        assert await uow.repo(Operation).add_many([]) == 0
        assert await uow.repo(UsageRecord).add_many([]) == 0
        assert await uow.repo(Operation).count() == 1
        assert await snapshot(storage) == before
        await uow.repo(Operation).add(op(2))  # the unit is as usable as before
        await uow.commit()
    assert sorted(await snapshot(storage)) == ["op-0001", "op-0002"]
    assert await usage_ids(storage) == []


# ---- add_missing --------------------------------------------------------------------------


@pytest.mark.parametrize("autocommit", [False, True], ids=["normal", "autocommit"])
async def test_add_missing_inserts_the_new_rows_skips_the_taken_keys_and_says_which_are_new(
    storage: Storage, autocommit: bool
) -> None:
    async with storage.unit_of_work() as uow:
        await uow.repo(UsageRecord).add(record(2, cost_micros=5))
        await uow.commit()
    async with storage.unit_of_work(autocommit=autocommit) as uow:
        added = await uow.repo(UsageRecord).add_missing(
            [record(1), record(2, cost_micros=99), record(3)]
        )
        await uow.commit()
    assert added == ["usage-0001", "usage-0003"]
    assert sorted(await usage_ids(storage)) == ["usage-0001", "usage-0002", "usage-0003"]
    async with storage.unit_of_work() as uow:
        kept = await uow.repo(UsageRecord).get("usage-0002")
    assert kept is not None and kept.cost_micros == 5  # the row already there is not compared


async def test_add_missing_of_rows_all_written_before_adds_nothing(storage: Storage) -> None:
    rows = [record(1), record(2)]
    for expected in (["usage-0001", "usage-0002"], []):
        async with storage.unit_of_work() as uow:
            assert await uow.repo(UsageRecord).add_missing(rows) == expected
            assert await uow.repo(ExecutionLog).add_missing([]) == []
            await uow.commit()
    assert sorted(await usage_ids(storage)) == ["usage-0001", "usage-0002"]


async def test_add_missing_sees_the_rows_its_own_unit_added_and_others_see_none_until_commit(
    storage: Storage,
) -> None:
    async with storage.unit_of_work() as uow:
        assert await uow.repo(UsageRecord).add_missing([record(1)]) == ["usage-0001"]
        assert await uow.repo(UsageRecord).add_missing([record(1), record(2)]) == ["usage-0002"]
        assert await usage_ids(storage) == []
        await uow.commit()
    assert sorted(await usage_ids(storage)) == ["usage-0001", "usage-0002"]


async def test_add_missing_still_refuses_another_unique_key_taken(storage: Storage) -> None:
    await add_ops(storage, [op(1, owner_key_id="key-a", idempotency_key="k1")])
    async with storage.unit_of_work() as uow:
        with pytest.raises(DuplicateKey):
            await uow.repo(Operation).add_missing(
                [op(2, owner_key_id="key-a", idempotency_key="k1")]
            )
            await uow.commit()
    assert sorted(await snapshot(storage)) == ["op-0001"]


# ---- write_where_adding -------------------------------------------------------------------


async def logs_of(storage: Storage) -> dict[str, dict[str, Any]]:
    async with storage.unit_of_work() as uow:
        page = await uow.repo(ExecutionLog).find()
    return {entry.id: comparable(entry) for entry in page.items}


@pytest.mark.parametrize("autocommit", [False, True], ids=["normal", "autocommit"])
async def test_write_where_adding_writes_and_adds_the_new_rows_of_every_type(
    storage: Storage, autocommit: bool
) -> None:
    await add_ops(storage, [op(1, status=RUNNING, lease_token="t")])
    async with storage.unit_of_work() as uow:
        await uow.repo(UsageRecord).add(record(2, cost_micros=5))
        await uow.commit()
    entry = log(1, input={"messages": [{"role": "user", "content": "hi"}]}, output=[1, [2, 3]])
    third = record(3, model_id=None)
    async with storage.unit_of_work(autocommit=autocommit) as uow:
        added = await uow.repo(Operation).write_where_adding(
            "op-0001",
            {"status": OperationStatus.COMPLETED, "result": {"answer": [1, [2]]}},
            Where.eq("status", RUNNING),
            Where.eq("lease_token", "t"),
            adding=[record(1), entry, record(2, cost_micros=99), third],
        )
        await uow.commit()
    assert added == ["usage-0001", "log-0001", "usage-0003"]
    written = await current(storage)
    assert written.status == OperationStatus.COMPLETED
    assert written.result == {"answer": [1, [2]]}
    assert written.version == 2
    assert sorted(await usage_ids(storage)) == ["usage-0001", "usage-0002", "usage-0003"]
    async with storage.unit_of_work() as uow:
        kept = await uow.repo(UsageRecord).get("usage-0002")
        stored_third = await uow.repo(UsageRecord).get("usage-0003")
    assert kept is not None and kept.cost_micros == 5  # the row already there is not compared
    assert stored_third is not None and comparable(stored_third) == comparable(third)
    assert await logs_of(storage) == {"log-0001": comparable(entry)}


@pytest.mark.parametrize("autocommit", [False, True], ids=["normal", "autocommit"])
async def test_write_where_adding_that_does_not_match_adds_nothing(
    storage: Storage, autocommit: bool
) -> None:
    await add_ops(storage, [op(1, status=RUNNING, lease_token="t")])
    before = await snapshot(storage)
    async with storage.unit_of_work(autocommit=autocommit) as uow:
        repo = uow.repo(Operation)
        for key, token in (("op-0001", "another"), ("op-0404", "t")):
            assert (
                await repo.write_where_adding(
                    key,
                    {"status": OperationStatus.COMPLETED},
                    Where.eq("lease_token", token),
                    adding=[record(1), log(1)],
                )
                is None
            )
        await uow.commit()
    assert await snapshot(storage) == before
    assert await usage_ids(storage) == []
    assert await logs_of(storage) == {}


async def test_write_where_adding_of_a_hundred_rows_of_a_type_adds_each_new_one(
    storage: Storage,
) -> None:
    # A job that made many calls carries many rows: past a few dozen they travel another way.
    await add_ops(storage, [op(1, status=RUNNING, lease_token="t")])
    async with storage.unit_of_work() as uow:
        await uow.repo(UsageRecord).add(record(50, cost_micros=5))
        await uow.commit()
    records = [record(i, cost_micros=i) for i in range(1, 101)]
    entries = [log(i, output={"n": i}) for i in range(1, 101)]
    async with storage.unit_of_work(autocommit=True) as uow:
        added = await uow.repo(Operation).write_where_adding(
            "op-0001",
            {"status": OperationStatus.COMPLETED},
            Where.eq("lease_token", "t"),
            adding=[*records, *entries],
        )
    assert added == [r.id for r in records if r.id != "usage-0050"] + [e.id for e in entries]
    assert sorted(await usage_ids(storage)) == sorted(r.id for r in records)
    async with storage.unit_of_work() as uow:
        last = await uow.repo(UsageRecord).get("usage-0100")
        kept = await uow.repo(UsageRecord).get("usage-0050")
    assert last is not None and comparable(last) == comparable(records[-1])
    assert kept is not None and kept.cost_micros == 5
    assert await logs_of(storage) == {e.id: comparable(e) for e in entries}


async def test_write_where_adding_of_nothing_is_write_where(storage: Storage) -> None:
    await add_ops(storage, [op(1)])
    async with storage.unit_of_work(autocommit=True) as uow:
        repo = uow.repo(Operation)
        assert await repo.write_where_adding("op-0001", {"attempts": 7}, adding=[]) == []
    assert (await current(storage)).attempts == 7


async def test_write_where_adding_in_a_normal_unit_commits_with_it_or_not_at_all(
    storage: Storage,
) -> None:
    await add_ops(storage, [op(1)])
    async with storage.unit_of_work() as uow:
        await uow.repo(Operation).write_where_adding("op-0001", {"attempts": 7}, adding=[log(1)])
        assert await logs_of(storage) == {}
        await uow.rollback()
    assert (await current(storage)).attempts == 1
    assert await logs_of(storage) == {}


@pytest.mark.parametrize("autocommit", [False, True], ids=["normal", "autocommit"])
async def test_write_where_adding_a_row_refused_writes_nothing(
    storage: Storage, autocommit: bool
) -> None:
    await add_ops(storage, [op(1, owner_key_id="key-a", idempotency_key="k1"), op(2)])
    before = await snapshot(storage)
    bad = record(2)
    bad.input_tokens = "many"  # type: ignore[assignment]  # table models do not validate
    refusals: list[tuple[list[Any], type[Exception]]] = [
        ([record(1), bad], InvalidInput),
        ([log(1, output={"when": object()})], InvalidInput),
        ([op(3, owner_key_id="key-a", idempotency_key="k1")], DuplicateKey),
    ]
    for adding, error in refusals:
        async with storage.unit_of_work(autocommit=autocommit) as uow:
            with pytest.raises(error):
                await uow.repo(Operation).write_where_adding(
                    "op-0002", {"attempts": 9}, adding=adding
                )
    assert await snapshot(storage) == before
    assert await usage_ids(storage) == []
    assert await logs_of(storage) == {}


# ---- units that are not durable -------------------------------------------------------------


@pytest.mark.parametrize("autocommit", [False, True], ids=["normal", "autocommit"])
async def test_a_unit_that_is_not_durable_writes_what_a_durable_one_would(
    storage: Storage, autocommit: bool
) -> None:
    await add_ops(storage, [op(1, status=PENDING), op(2)])
    async with storage.unit_of_work(autocommit=autocommit, durable=False) as uow:
        repo = uow.repo(Operation)
        claimed = await repo.update_where(
            "op-0001", {"status": RUNNING, "attempts": Increment(1)}, Where.eq("status", PENDING)
        )
        assert claimed is not None and claimed.attempts == 2
        assert (
            await repo.update_where("op-0001", {"attempts": 0}, Where.eq("status", PENDING)) is None
        )
        assert await repo.write_where("op-0002", {"lease_token": "t"})
        await repo.add(op(3))
        await uow.commit()
    first, second = await current(storage, "op-0001"), await current(storage, "op-0002")
    assert (first.status, first.attempts, second.lease_token) == (RUNNING, 2, "t")
    assert sorted(await snapshot(storage)) == ["op-0001", "op-0002", "op-0003"]


@pytest.mark.postgres
async def test_a_postgres_transaction_that_is_not_durable_commits_asynchronously(
    postgres: SqlStorage,
) -> None:
    await add_ops(postgres, [op(1)])
    for durable, setting in ((True, "on"), (False, "off")):
        async with postgres.unit_of_work(durable=durable) as uow:
            await uow.repo(Operation).write_where("op-0001", {"attempts": Increment(1)})
            shown = await uow._fetch("SHOW synchronous_commit", {}, None)
            await uow.commit()
        assert shown[0][0] == setting
    assert (await current(postgres)).attempts == 3


INVALID_VALUES: dict[str, tuple[str, Any]] = {
    "unknown-status": ("status", "exploded"),
    "not-a-number": ("attempts", "many"),
    "too-long": ("lease_token", "x" * 65),
    "null-in-required": ("queue", None),
    "not-an-instant": ("lease_expires_at", "soon-ish"),
    "list-for-object": ("progress", [1, 2]),
    "not-json": ("result", {"when": object()}),
}


def _batch_with_one_invalid(column: str, value: Any) -> list[Operation]:
    bad = op(2)
    setattr(bad, column, value)  # table models do not validate assignments
    return [op(1), bad, op(3)]


@pytest.mark.parametrize(("column", "value"), INVALID_VALUES.values(), ids=INVALID_VALUES.keys())
async def test_an_invalid_value_in_a_batch_is_invalid_input_naming_the_column_and_adds_none(
    storage: Storage, column: str, value: Any
) -> None:
    async with storage.unit_of_work() as uow:
        with pytest.raises(InvalidInput) as refused:
            await uow.repo(Operation).add_many(_batch_with_one_invalid(column, value))
        # Whether or not the unit may still commit, the refused batch must not be part of it.
        with contextlib.suppress(RuntimeError):
            await uow.commit()
    assert refused.value.param == column
    assert await snapshot(storage) == {}


@pytest.mark.parametrize(("column", "value"), INVALID_VALUES.values(), ids=INVALID_VALUES.keys())
async def test_an_invalid_autocommit_batch_adds_none_and_the_unit_goes_on(
    storage: Storage, column: str, value: Any
) -> None:
    async with storage.unit_of_work(autocommit=True) as uow:
        repo = uow.repo(Operation)
        with pytest.raises(InvalidInput) as refused:
            await repo.add_many(_batch_with_one_invalid(column, value))
        assert await snapshot(storage) == {}
        await repo.add_many([op(4)])
    assert refused.value.param == column
    assert sorted(await snapshot(storage)) == ["op-0004"]


# ---- JSON columns holding null -----------------------------------------------------------

# Values that are there, however empty or false they look: none of them is null.
PRESENT_JSON: list[Any] = [0, False, "", [], {}, [None], {"answer": None}, "null"]


async def test_a_json_column_set_to_none_reads_back_as_none_however_it_was_written(
    storage: Storage,
) -> None:
    await add_ops(storage, [op(1, result=None), op(2, result={"a": 1}), op(3, result=[1])])
    async with storage.unit_of_work() as uow:
        repo = uow.repo(Operation)
        await repo.add_many([op(4, result=None), op(5, result=0), op(6, result=["x"])])
        assert await repo.update_where("op-0002", {"result": None})
        six = await repo.get("op-0006")
        assert six is not None
        six.result = None
        await repo.update(six)
        await uow.repo(ExecutionLog).add_many([log(1, output=None), log(2, output=False)])
        await uow.commit()
    async with storage.unit_of_work() as uow:
        results = {o.id: o.result for o in (await uow.repo(Operation).find()).items}
        outputs = {e.id: e.output for e in (await uow.repo(ExecutionLog).find()).items}
    assert results == {
        "op-0001": None,
        "op-0002": None,
        "op-0003": [1],
        "op-0004": None,
        "op-0005": 0,
        "op-0006": None,
    }
    assert outputs == {"log-0001": None, "log-0002": False}


async def test_is_null_on_a_json_column_selects_exactly_the_rows_without_a_value(
    storage: Storage,
) -> None:
    present = [op(10 + i, result=value) for i, value in enumerate(PRESENT_JSON)]
    await add_ops(storage, [op(1, result=None), op(2, result={"a": 1}), op(3), *present])
    async with storage.unit_of_work() as uow:
        repo = uow.repo(Operation)
        await repo.add_many([op(4, result=None), op(5, result=[])])
        assert await repo.update_where("op-0002", {"result": None})  # had a value, now none
        assert await repo.update_where("op-0003", {"result": 7})  # had none, now a value
        await uow.repo(ExecutionLog).add_many([log(1, output=None), log(2, output=0)])
        await uow.commit()
    absent = ["op-0001", "op-0002", "op-0004"]
    there = ["op-0003", "op-0005", *(o.id for o in present)]
    async with storage.unit_of_work() as uow:
        repo = uow.repo(Operation)
        assert [o.id for o in (await repo.find(Where.is_null("result"))).items] == absent
        assert [o.id for o in (await repo.find(Where.is_null("result", False))).items] == there
        assert await repo.count(Where.is_null("result")) == len(absent)
        assert await repo.count(Where.is_null("result", False)) == len(there)
        logs = uow.repo(ExecutionLog)
        assert [e.id for e in (await logs.find(Where.is_null("output"))).items] == ["log-0001"]
        assert [e.id for e in (await logs.find(Where.is_null("output", False))).items] == [
            "log-0002"
        ]
        assert await repo.delete_where(Where.is_null("result")) == len(absent)
        await uow.commit()
    assert sorted(await snapshot(storage)) == sorted(there)


@pytest.mark.postgres
async def test_postgres_stores_a_json_none_as_sql_null_however_it_was_written(
    postgres: SqlStorage, database_url: str
) -> None:
    await add_ops(postgres, [op(1, result=None), op(2, result={"a": 1}), op(3, result=0)])
    async with postgres.unit_of_work() as uow:
        repo = uow.repo(Operation)
        await repo.add_many([op(4, result=None), op(5, result="null")])
        assert await repo.update_where("op-0002", {"result": None})
        three = await repo.get("op-0003")
        assert three is not None
        three.result = None
        await repo.update(three)
        await uow.commit()
    with psycopg.connect(database_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT id, result IS NULL, jsonb_typeof(result) FROM operations ORDER BY id"
        ).fetchall()
    assert rows == [
        ("op-0001", True, None),
        ("op-0002", True, None),
        ("op-0003", True, None),
        ("op-0004", True, None),
        ("op-0005", False, "string"),
    ]


@pytest.mark.postgres
async def test_postgres_reads_a_stored_json_null_as_null(
    postgres: SqlStorage, database_url: str
) -> None:
    # Rows written before None was stored as SQL NULL hold a JSON null instead.
    await add_ops(postgres, [op(1, result={"a": 1}), op(2, result=None), op(3, result=0)])
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE operations SET result = 'null'::jsonb WHERE id = 'op-0001'")
    assert (await current(postgres, "op-0001")).result is None
    async with postgres.unit_of_work(autocommit=True) as uow:
        repo = uow.repo(Operation)
        assert [o.id for o in (await repo.find(Where.is_null("result"))).items] == [
            "op-0001",
            "op-0002",
        ]
        assert [o.id for o in (await repo.find(Where.is_null("result", False))).items] == [
            "op-0003"
        ]
        assert await repo.count(Where.is_null("result")) == 2
        assert (
            await repo.update_where("op-0001", {"attempts": 4}, Where.is_null("result", False))
            is None
        )
        written = await repo.update_where("op-0001", {"attempts": 4}, Where.is_null("result"))
    assert written is not None and written.attempts == 4 and written.result is None

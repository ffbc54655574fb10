"""The storage contract: the same behaviour from the memory and the PostgreSQL backends."""

from __future__ import annotations

import asyncio
import threading
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest

from app.core.errors import (
    Conflict,
    DuplicateKey,
    InvalidInput,
    NotFound,
    ReferenceViolation,
    StaleVersion,
)
from app.experiments.entities import ExperimentRecord
from app.operations.entities import Operation, OperationStatus
from app.queue.names import OperationKind
from app.schema import ENTITIES
from app.storage.entity import Entity
from app.storage.mapping import referencing, table_info
from app.storage.memory import MemoryStorage
from app.storage.protocol import Increment, Moments, Storage, Tally, Where, given
from tests.factories import BASE_INSTANT, build, comparable, create

ENTITY_IDS = [e.__name__ for e in ENTITIES]
WITH_SECONDARY_UNIQUE = [e for e in ENTITIES if len(table_info(e).unique) > 1]
WITH_REFERENCES = [e for e in ENTITIES if table_info(e).references]


def op(n: int, **overrides: Any) -> Operation:
    """An operation whose sortable fields follow `n`."""
    values: dict[str, Any] = {
        "id": f"op-{n:04d}",
        "kind": OperationKind.CHAT_COMPLETION,
        "status": OperationStatus.PENDING,
        "queue": "chat",
        "attempts": n % 5,
        "owner_key_id": f"key-{n % 3}",
        "created_at": BASE_INSTANT + timedelta(seconds=n // 2),
    }
    values.update(overrides)
    return Operation.model_validate(values)


async def add_ops(storage: Storage, ops: list[Operation]) -> None:
    async with storage.unit_of_work() as uow:
        for item in ops:
            await uow.repo(Operation).add(item)
        await uow.commit()


# ---- every entity ----------------------------------------------------------------------


@pytest.mark.parametrize("entity", ENTITIES, ids=ENTITY_IDS)
async def test_every_field_round_trips(storage: Storage, entity: type[Entity]) -> None:
    async with storage.unit_of_work() as uow:
        added = await create(uow, entity)
        await uow.commit()
    async with storage.unit_of_work() as uow:
        loaded = await uow.repo(entity).get(getattr(added, table_info(entity).pk))
    assert loaded is not None
    assert comparable(loaded) == comparable(added)
    for name, value in comparable(loaded).items():
        assert type(value) is type(getattr(added, name)), name
    assert loaded.created_at.utcoffset() == timedelta(0)


@pytest.mark.parametrize("entity", ENTITIES, ids=ENTITY_IDS)
async def test_update_bumps_version_and_refuses_a_stale_one(
    storage: Storage, entity: type[Entity]
) -> None:
    async with storage.unit_of_work() as uow:
        added = await create(uow, entity)
        await uow.commit()
    key = getattr(added, table_info(entity).pk)
    fresh = build(
        entity, **{fk.column: getattr(added, fk.column) for fk in table_info(entity).references}
    )
    changed = added.model_copy()
    for name in table_info(entity).columns:
        if name in {table_info(entity).pk, "created_at", "updated_at", "version"}:
            continue
        if any(fk.column == name for fk in table_info(entity).references):
            continue
        setattr(changed, name, getattr(fresh, name))
    async with storage.unit_of_work() as uow:
        updated = await uow.repo(entity).update(changed)
        await uow.commit()
    assert updated.version == added.version + 1
    assert updated.updated_at > added.updated_at
    assert updated.created_at == added.created_at
    async with storage.unit_of_work() as uow:
        loaded = await uow.repo(entity).get(key)
        assert loaded is not None
        assert comparable(loaded) == comparable(updated)
        with pytest.raises(StaleVersion):
            await uow.repo(entity).update(changed)


@pytest.mark.parametrize("entity", ENTITIES, ids=ENTITY_IDS)
async def test_adding_a_taken_primary_key_is_a_conflict(
    storage: Storage, entity: type[Entity]
) -> None:
    async with storage.unit_of_work() as uow:
        added = await create(uow, entity)
        await uow.commit()
    info = table_info(entity)
    refs = {fk.column: getattr(added, fk.column) for fk in info.references}
    # The key may itself be a reference (a document's source is keyed by its document).
    twin = build(entity, **{**refs, info.pk: getattr(added, info.pk)})
    async with storage.unit_of_work() as uow:
        with pytest.raises(DuplicateKey):
            await uow.repo(entity).add(twin)


@pytest.mark.parametrize("entity", WITH_SECONDARY_UNIQUE, ids=lambda e: e.__name__)
async def test_secondary_unique_keys_are_conflicts(storage: Storage, entity: type[Entity]) -> None:
    info = table_info(entity)
    async with storage.unit_of_work() as uow:
        first = await create(uow, entity)
        await uow.commit()
    for cols in info.unique[1:]:
        refs = {fk.column: getattr(first, fk.column) for fk in info.references}
        clash = build(entity, **{**refs, **{c: getattr(first, c) for c in cols}})
        async with storage.unit_of_work() as uow:
            with pytest.raises(Conflict):
                await uow.repo(entity).add(clash)


@pytest.mark.parametrize("entity", ENTITIES, ids=ENTITY_IDS)
async def test_delete_removes_and_reports_whether_it_existed(
    storage: Storage, entity: type[Entity]
) -> None:
    async with storage.unit_of_work() as uow:
        added = await create(uow, entity)
        await uow.commit()
    key = getattr(added, table_info(entity).pk)
    async with storage.unit_of_work() as uow:
        assert await uow.repo(entity).delete(key) is True
        assert await uow.repo(entity).delete(key) is False
        await uow.commit()
    async with storage.unit_of_work() as uow:
        assert await uow.repo(entity).get(key) is None


# ---- updates and versions ----------------------------------------------------------------


async def test_update_of_a_missing_entity_is_not_found(storage: Storage) -> None:
    async with storage.unit_of_work() as uow:
        with pytest.raises(NotFound):
            await uow.repo(Operation).update(op(1))


async def test_concurrent_updates_of_one_version_let_exactly_one_win(storage: Storage) -> None:
    await add_ops(storage, [op(1)])
    read = asyncio.Event()

    async def writer(attempts: int, readers: list[int]) -> int:
        async with storage.unit_of_work() as uow:
            current = await uow.repo(Operation).get("op-0001")
            assert current is not None
            readers.append(attempts)
            if len(readers) == 2:
                read.set()
            await read.wait()  # both have read version 1 before either writes
            current.attempts = attempts
            await uow.repo(Operation).update(current)
            await uow.commit()
        return attempts

    readers: list[int] = []
    outcomes = await asyncio.gather(
        writer(10, readers), writer(20, readers), return_exceptions=True
    )
    winners = [o for o in outcomes if isinstance(o, int)]
    losers = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(winners) == 1 and len(losers) == 1
    assert isinstance(losers[0], StaleVersion)
    async with storage.unit_of_work() as uow:
        stored = await uow.repo(Operation).get("op-0001")
    assert stored is not None and stored.attempts == winners[0] and stored.version == 2


async def test_invalid_values_are_refused_before_they_are_stored(storage: Storage) -> None:
    bad_status = Operation(id="op-bad", kind="chat_completion", status="exploded", queue="q")
    not_json = op(2, input={"when": object()})
    async with storage.unit_of_work() as uow:
        with pytest.raises(InvalidInput):
            await uow.repo(Operation).add(bad_status)
    async with storage.unit_of_work() as uow:
        with pytest.raises(InvalidInput):
            await uow.repo(Operation).add(not_json)
    async with storage.unit_of_work() as uow:
        assert await uow.repo(Operation).count() == 0


async def test_returned_entities_are_copies(storage: Storage) -> None:
    await add_ops(storage, [op(1, input={"messages": [{"role": "user"}]})])
    async with storage.unit_of_work() as uow:
        first = await uow.repo(Operation).get("op-0001")
        assert first is not None
        first.input["messages"].append({"role": "intruder"})
        first.attempts = 99
        again = await uow.repo(Operation).get("op-0001")
    assert again is not None
    assert again.input == {"messages": [{"role": "user"}]}
    assert again.attempts == 1


# ---- transactions --------------------------------------------------------------------------


async def test_rollback_discards_every_write(storage: Storage) -> None:
    await add_ops(storage, [op(1)])
    async with storage.unit_of_work() as uow:
        await uow.repo(Operation).add(op(2))
        existing = await uow.repo(Operation).get("op-0001")
        assert existing is not None
        existing.attempts = 42
        await uow.repo(Operation).update(existing)
        await uow.repo(Operation).delete("op-0001")
        assert await uow.repo(Operation).count() == 1  # reads see the unit's own writes
        await uow.rollback()
    async with storage.unit_of_work() as uow:
        kept = await uow.repo(Operation).get("op-0001")
        assert kept is not None and kept.attempts == 1 and kept.version == 1
        assert await uow.repo(Operation).get("op-0002") is None


async def test_a_unit_that_reads_before_it_writes_still_rolls_back_every_write(
    storage: Storage,
) -> None:
    await add_ops(storage, [op(1)])
    async with storage.unit_of_work() as uow:
        existing = await uow.repo(Operation).get("op-0001")  # the first statement only reads
        assert existing is not None
        existing.attempts = 42
        await uow.repo(Operation).update(existing)
        await uow.repo(Operation).add(op(2))
        await uow.rollback()
    async with storage.unit_of_work() as uow:
        kept = await uow.repo(Operation).get("op-0001")
        assert kept is not None and kept.attempts == 1
        assert await uow.repo(Operation).count() == 1


async def test_a_unit_that_reads_before_it_writes_commits_every_write(storage: Storage) -> None:
    await add_ops(storage, [op(1)])
    async with storage.unit_of_work() as uow:
        assert await uow.repo(Operation).count() == 1
        await uow.repo(Operation).add(op(2))
        assert await uow.repo(Operation).count() == 2
        await uow.commit()
    async with storage.unit_of_work() as uow:
        assert await uow.repo(Operation).count() == 2


async def test_leaving_without_commit_rolls_back(storage: Storage) -> None:
    async with storage.unit_of_work() as uow:
        await uow.repo(Operation).add(op(1))
    async with storage.unit_of_work() as uow:
        assert await uow.repo(Operation).count() == 0


async def test_uncommitted_writes_are_invisible_to_other_units(storage: Storage) -> None:
    async with storage.unit_of_work() as writer:
        await writer.repo(Operation).add(op(1))
        async with storage.unit_of_work() as reader:
            assert await reader.repo(Operation).get("op-0001") is None
        await writer.commit()
    async with storage.unit_of_work() as reader:
        assert await reader.repo(Operation).get("op-0001") is not None


async def test_after_commit_callbacks_run_only_on_commit(storage: Storage) -> None:
    ran: list[str] = []

    async def async_callback() -> None:
        ran.append("async")

    async with storage.unit_of_work() as uow:
        await uow.repo(Operation).add(op(1))
        uow.on_commit(lambda: ran.append("sync"))
        uow.on_commit(async_callback)
        assert ran == []
        await uow.commit()
    assert ran == ["sync", "async"]
    async with storage.unit_of_work() as uow:
        await uow.repo(Operation).add(op(2))
        uow.on_commit(lambda: ran.append("never"))
    assert "never" not in ran


async def test_a_unit_that_hit_a_constraint_must_be_rolled_back(storage: Storage) -> None:
    await add_ops(storage, [op(1)])
    async with storage.unit_of_work() as uow:
        with pytest.raises(DuplicateKey):
            await uow.repo(Operation).add(op(1))
        with pytest.raises(RuntimeError):
            await uow.repo(Operation).get("op-0001")


# ---- references ------------------------------------------------------------------------------


@pytest.mark.parametrize("entity", WITH_REFERENCES, ids=lambda e: e.__name__)
async def test_a_reference_to_a_missing_row_is_refused(
    storage: Storage, entity: type[Entity]
) -> None:
    info = table_info(entity)
    async with storage.unit_of_work() as uow:
        added = await create(uow, entity)
        await uow.commit()
    dangling = {fk.column: getattr(added, fk.column) for fk in info.references}
    dangling[info.references[0].column] = "does-not-exist"
    async with storage.unit_of_work() as uow:
        with pytest.raises(ReferenceViolation):
            await uow.repo(entity).add(build(entity, **dangling))


@pytest.mark.parametrize("entity", WITH_REFERENCES, ids=lambda e: e.__name__)
async def test_deleting_a_parent_follows_the_reference_rule(
    storage: Storage, entity: type[Entity]
) -> None:
    info = table_info(entity)
    async with storage.unit_of_work() as uow:
        child = await create(uow, entity)
        await uow.commit()
    fk = info.references[0]
    parent_type = next(e for e in ENTITIES if table_info(e).name == fk.target_table)
    parent_key = getattr(child, fk.column)
    child_key = getattr(child, info.pk)
    async with storage.unit_of_work() as uow:
        if fk.on_delete in ("RESTRICT", "NO ACTION"):
            with pytest.raises(ReferenceViolation):
                await uow.repo(parent_type).delete(parent_key)
            return
        assert await uow.repo(parent_type).delete(parent_key)
        await uow.commit()
    async with storage.unit_of_work() as uow:
        remaining = await uow.repo(entity).get(child_key)
    if fk.on_delete == "CASCADE":
        assert remaining is None
    else:
        assert remaining is not None and getattr(remaining, fk.column) is None


def test_every_reference_has_an_explicit_rule() -> None:
    for entity in ENTITIES:
        for fk in referencing(table_info(entity).name):
            assert fk.on_delete in {"CASCADE", "SET NULL", "RESTRICT"}, fk


# ---- find, order, pages, count ----------------------------------------------------------------


async def test_find_applies_each_kind_of_filter(storage: Storage) -> None:
    await add_ops(
        storage,
        [op(n, lease_expires_at=BASE_INSTANT if n % 4 == 0 else None) for n in range(1, 21)],
    )

    async def ids(*where: Where) -> list[str]:
        async with storage.unit_of_work() as uow:
            page = await uow.repo(Operation).find(*where, order_by=["id"])
        return [o.id for o in page.items]

    assert await ids(Where.eq("owner_key_id", "key-1")) == [
        f"op-{n:04d}" for n in range(1, 21) if n % 3 == 1
    ]
    assert len(await ids(Where.ne("owner_key_id", "key-1"))) == 13
    assert await ids(Where.lt("attempts", 1)) == ["op-0005", "op-0010", "op-0015", "op-0020"]
    assert len(await ids(Where.le("attempts", 1))) == 8
    assert len(await ids(Where.gt("attempts", 3))) == 4
    assert len(await ids(Where.ge("attempts", 3))) == 8
    assert await ids(Where.in_("id", ["op-0002", "op-0003", "op-9999"])) == ["op-0002", "op-0003"]
    assert await ids(Where.in_("id", [])) == []
    assert await ids(Where.is_null("lease_expires_at", False)) == [
        "op-0004",
        "op-0008",
        "op-0012",
        "op-0016",
        "op-0020",
    ]
    assert len(await ids(Where.is_null("lease_expires_at"))) == 15
    assert await ids(Where.eq("status", OperationStatus.PENDING), Where.eq("attempts", 4)) == [
        "op-0004",
        "op-0009",
        "op-0014",
        "op-0019",
    ]
    window = await ids(
        Where.ge("created_at", BASE_INSTANT + timedelta(seconds=2)),
        Where.lt("created_at", BASE_INSTANT + timedelta(seconds=4)),
    )
    assert window == ["op-0004", "op-0005", "op-0006", "op-0007"]


async def test_find_orders_by_several_fields_with_the_key_breaking_ties(storage: Storage) -> None:
    await add_ops(storage, [op(n) for n in range(1, 11)])
    async with storage.unit_of_work() as uow:
        page = await uow.repo(Operation).find(order_by=["-attempts", "created_at"])
    got = [(o.attempts, o.created_at, o.id) for o in page.items]
    assert got == sorted(got, key=lambda t: (-t[0], t[1], t[2]))
    async with storage.unit_of_work() as uow:
        newest = await uow.repo(Operation).find(order_by=["-created_at"], limit=3)
    assert [o.id for o in newest.items] == ["op-0010", "op-0009", "op-0008"]


async def test_nulls_sort_last_ascending_and_first_descending(storage: Storage) -> None:
    await add_ops(storage, [op(1), op(2, run_after=BASE_INSTANT), op(3)])
    async with storage.unit_of_work() as uow:
        asc = await uow.repo(Operation).find(order_by=["run_after"])
        desc = await uow.repo(Operation).find(order_by=["-run_after"])
    assert [o.id for o in asc.items] == ["op-0002", "op-0001", "op-0003"]
    assert [o.id for o in desc.items] == ["op-0003", "op-0001", "op-0002"]


@pytest.mark.parametrize("order", [["created_at"], ["-created_at"], ["-attempts", "created_at"]])
async def test_cursor_pages_cover_every_row_exactly_once(
    storage: Storage, order: list[str]
) -> None:
    await add_ops(storage, [op(n) for n in range(1, 48)])
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        async with storage.unit_of_work() as uow:
            page = await uow.repo(Operation).find(order_by=order, limit=10, after=cursor)
        seen.extend(o.id for o in page.items)
        pages += 1
        cursor = page.next_cursor
        if cursor is None:
            break
    assert pages == 5
    assert sorted(seen) == [f"op-{n:04d}" for n in range(1, 48)]
    async with storage.unit_of_work() as uow:
        whole = await uow.repo(Operation).find(order_by=order)
    assert seen == [o.id for o in whole.items]


async def test_cursor_pages_have_no_gaps_or_repeats_under_concurrent_inserts(
    storage: Storage,
) -> None:
    await add_ops(storage, [op(n) for n in range(0, 100, 2)])
    seen: list[str] = []
    cursor: str | None = None
    inserted = iter(range(1, 100, 2))
    while True:
        async with storage.unit_of_work() as uow:
            page = await uow.repo(Operation).find(order_by=["created_at"], limit=7, after=cursor)
        seen.extend(o.id for o in page.items)
        # Between pages, someone else inserts rows before and after the cursor.
        for n in [next(inserted, None), next(inserted, None)]:
            if n is not None:
                await add_ops(storage, [op(n)])
        cursor = page.next_cursor
        if cursor is None:
            break
    assert len(seen) == len(set(seen)), "a row was returned twice"
    assert {f"op-{n:04d}" for n in range(0, 100, 2)} <= set(seen), "a row was skipped"


async def test_a_cursor_for_another_ordering_or_garbage_is_refused(storage: Storage) -> None:
    await add_ops(storage, [op(n) for n in range(1, 5)])
    async with storage.unit_of_work() as uow:
        page = await uow.repo(Operation).find(order_by=["created_at"], limit=2)
        assert page.next_cursor is not None
        with pytest.raises(InvalidInput):
            await uow.repo(Operation).find(
                order_by=["-created_at"], limit=2, after=page.next_cursor
            )
        with pytest.raises(InvalidInput):
            await uow.repo(Operation).find(order_by=["created_at"], limit=2, after="not a cursor")


async def test_a_page_may_sort_by_a_nullable_column_only_where_it_holds_no_null(
    storage: Storage,
) -> None:
    started = [op(n, started_at=BASE_INSTANT + timedelta(seconds=10 - n)) for n in range(1, 5)]
    await add_ops(storage, [*started, op(5), op(6)])
    async with storage.unit_of_work() as uow:
        repo = uow.repo(Operation)
        with pytest.raises(ValueError):
            await repo.find(order_by=["started_at"], limit=1)
        first = await repo.find(
            Where.is_null("started_at", False), order_by=["started_at"], limit=1
        )
        last = await repo.find(
            Where.is_null("started_at", False), order_by=["-started_at"], limit=1
        )
        after = await repo.find(
            Where.gt("started_at", BASE_INSTANT), order_by=["started_at"], after=first.next_cursor
        )
    assert [o.id for o in first.items] == ["op-0004"] and first.next_cursor is not None
    assert [o.id for o in last.items] == ["op-0001"]
    assert [o.id for o in after.items] == ["op-0003", "op-0002", "op-0001"]


async def test_count_and_delete_where_follow_the_conditions(storage: Storage) -> None:
    await add_ops(storage, [op(n) for n in range(1, 21)])
    async with storage.unit_of_work() as uow:
        repo = uow.repo(Operation)
        assert await repo.count() == 20
        assert await repo.count(Where.eq("owner_key_id", "key-0")) == 6
        assert await repo.delete_where(Where.eq("owner_key_id", "key-0")) == 6
        assert await repo.count() == 14
        await uow.commit()
    async with storage.unit_of_work() as uow:
        assert await uow.repo(Operation).count(Where.eq("owner_key_id", "key-0")) == 0


async def test_update_all_changes_every_matching_row_and_bumps_its_version(
    storage: Storage,
) -> None:
    await add_ops(storage, [op(n) for n in range(1, 11)])
    async with storage.unit_of_work() as uow:
        repo = uow.repo(Operation)
        changed = await repo.update_all(
            {"queue": "moved", "attempts": Increment(10)}, Where.eq("owner_key_id", "key-1")
        )
        none = await repo.update_all({"queue": "nowhere"}, Where.eq("owner_key_id", "key-9"))
        with pytest.raises(ValueError):
            await repo.update_all({"no_such_column": 1})
        await uow.commit()
    async with storage.unit_of_work() as uow:
        moved = await uow.repo(Operation).find(Where.eq("queue", "moved"), order_by=["id"])
        kept = await uow.repo(Operation).count(Where.eq("queue", "chat"))
    assert (changed, none, kept) == (4, 0, 6)
    assert [(o.id, o.attempts, o.version) for o in moved.items] == [
        ("op-0001", 11, 2),
        ("op-0004", 14, 2),
        ("op-0007", 12, 2),
        ("op-0010", 10, 2),
    ]


# ---- commit stamps ---------------------------------------------------------------------


async def _stamp_of(storage: Storage, record_id: str) -> int:
    async with storage.unit_of_work() as uow:
        found = await uow.repo(ExperimentRecord).get(record_id)
    assert found is not None and found.commit_stamp is not None
    return found.commit_stamp


async def _horizon_past(storage: Storage, stamp: int) -> int:
    for _ in range(300):
        async with storage.unit_of_work() as uow:
            horizon = await uow.commit_horizon()
        if horizon > stamp:
            return horizon
        await asyncio.sleep(0.1)
    raise AssertionError(f"the horizon stayed at or below {stamp}")


async def test_a_row_committed_after_a_horizon_was_read_is_stamped_at_or_above_it(
    storage: Storage,
) -> None:
    async with storage.unit_of_work() as uow:
        before = await uow.commit_horizon()
    async with storage.unit_of_work() as uow:
        first = await create(uow, ExperimentRecord)
        await uow.commit()
    stamp = await _stamp_of(storage, first.id)
    after = await _horizon_past(storage, stamp)
    async with storage.unit_of_work() as uow:
        second = await create(uow, ExperimentRecord, experiment_id=first.experiment_id)
        await uow.commit()
    # Committed, a row falls below the horizon (once every unit open before it ended: on a
    # shared PostgreSQL server, others' too); one written later is above.
    assert before <= stamp < after <= await _stamp_of(storage, second.id)
    # An update keeps the stamp, whatever the entity carries.
    async with storage.unit_of_work() as uow:
        loaded = await uow.repo(ExperimentRecord).get(first.id)
        assert loaded is not None
        loaded.commit_stamp, loaded.latency_ms = 0, 7
        await uow.repo(ExperimentRecord).update(loaded)
        await uow.commit()
    assert await _stamp_of(storage, first.id) == stamp


async def test_a_row_added_with_a_conditional_write_is_stamped_as_any_insert(
    storage: Storage,
) -> None:
    await add_ops(storage, [op(1)])
    async with storage.unit_of_work() as uow:
        first = await create(uow, ExperimentRecord)
        await uow.commit()
    after = await _horizon_past(storage, await _stamp_of(storage, first.id))
    carried = build(ExperimentRecord, experiment_id=first.experiment_id, commit_stamp=0)
    async with storage.unit_of_work(autocommit=True) as uow:
        added = await uow.repo(Operation).write_where_adding(
            "op-0001", {"attempts": 2}, adding=[carried]
        )
    assert added == [carried.id]
    assert await _stamp_of(storage, carried.id) >= after  # not the 0 the entity carried


async def test_the_rows_of_a_unit_still_open_are_never_below_another_units_horizon(
    storage: Storage,
) -> None:
    async with storage.unit_of_work() as uow:
        parent = await create(uow, ExperimentRecord)
        await uow.commit()
    async with storage.unit_of_work() as writer:
        record = await create(writer, ExperimentRecord, experiment_id=parent.experiment_id)
        await _horizon_past(storage, await _stamp_of(storage, parent.id))
        async with storage.unit_of_work() as reader:
            horizon = await reader.commit_horizon()
            # Nothing below the horizon is still to come: what the reader sees there is final.
            seen = await reader.repo(ExperimentRecord).find(Where.lt("commit_stamp", horizon))
        await writer.commit()
    assert [r.id for r in seen.items] == [parent.id]
    assert await _stamp_of(storage, record.id) >= horizon


async def test_update_all_refuses_to_overwrite_a_row_another_unit_changed(
    storage: Storage,
) -> None:
    await add_ops(storage, [op(1)])
    async with storage.unit_of_work() as reader:
        seen = await reader.repo(Operation).get("op-0001")
        assert seen is not None
        async with storage.unit_of_work(autocommit=True) as claimer:
            assert await claimer.repo(Operation).update_all({"queue": "claimed"}) == 1
        seen.queue = "stale"
        with pytest.raises(StaleVersion):
            await reader.repo(Operation).update(seen)


async def test_count_by_groups_the_matching_rows_with_the_least_value_of_each_group(
    storage: Storage,
) -> None:
    # Queues "chat" and "batch"; one running job, to be left out by the condition.
    jobs = [op(n, queue="chat" if n % 2 else "batch") for n in range(1, 8)]
    jobs.append(op(8, queue="chat", status=OperationStatus.RUNNING, created_at=BASE_INSTANT))
    await add_ops(storage, jobs)
    pending = Where.eq("status", OperationStatus.PENDING)
    async with storage.unit_of_work() as uow:
        repo = uow.repo(Operation)
        groups = await repo.count_by("queue", pending, least="created_at")
        plain = await repo.count_by("queue")
        none = await repo.count_by("queue", Where.eq("status", OperationStatus.FAILED))
        with pytest.raises(ValueError):
            await repo.count_by("no_such_column")
    # op(n) is created at BASE_INSTANT + n // 2 seconds: op-0001 first among the odd ones.
    assert groups == {
        "chat": Tally(4, BASE_INSTANT),
        "batch": Tally(3, BASE_INSTANT + timedelta(seconds=1)),
    }
    assert plain == {"chat": Tally(5), "batch": Tally(3)}
    assert none == {}


async def test_get_many_returns_existing_rows_in_the_order_asked(storage: Storage) -> None:
    await add_ops(storage, [op(n) for n in range(1, 6)])
    async with storage.unit_of_work() as uow:
        got = await uow.repo(Operation).get_many(["op-0004", "op-9999", "op-0001"])
    assert [o.id for o in got] == ["op-0004", "op-0001"]


async def test_decimals_keep_their_value(storage: Storage) -> None:
    from app.models.entities import Model

    async with storage.unit_of_work() as uow:
        model = await create(uow, Model, input_price_per_million=Decimal("0.150000"))
        await uow.commit()
    async with storage.unit_of_work() as uow:
        loaded = await uow.repo(Model).get(model.id)
    assert loaded is not None and loaded.input_price_per_million == Decimal("0.15")


# ---- concurrency -------------------------------------------------------------------------------


async def test_concurrent_writers_lose_nothing(storage: Storage) -> None:
    async def writer(w: int) -> None:
        for i in range(25):
            async with storage.unit_of_work() as uow:
                await uow.repo(Operation).add(op(w * 100 + i, id=f"op-w{w}-{i}"))
                await uow.commit()

    await asyncio.gather(*(writer(w) for w in range(8)))
    async with storage.unit_of_work() as uow:
        assert await uow.repo(Operation).count() == 200


async def test_concurrent_counter_increments_with_retry_lose_nothing(storage: Storage) -> None:
    await add_ops(storage, [op(1, attempts=0)])

    async def increment() -> None:
        while True:
            async with storage.unit_of_work() as uow:
                current = await uow.repo(Operation).get("op-0001")
                assert current is not None
                current.attempts += 1
                try:
                    await uow.repo(Operation).update(current)
                    await uow.commit()
                    return
                except StaleVersion:
                    continue

    await asyncio.gather(*(increment() for _ in range(20)))
    async with storage.unit_of_work() as uow:
        final = await uow.repo(Operation).get("op-0001")
    assert final is not None and final.attempts == 20 and final.version == 21


def test_memory_backend_threads_writing_at_once_lose_nothing() -> None:
    storage = MemoryStorage()
    asyncio.run(add_ops(storage, [op(1, attempts=0)]))
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        async def run() -> None:
            for i in range(50):
                async with storage.unit_of_work() as uow:
                    await uow.repo(Operation).add(op(t * 1000 + i, id=f"op-t{t}-{i}"))
                    await uow.commit()
                while True:
                    async with storage.unit_of_work() as uow:
                        current = await uow.repo(Operation).get("op-0001")
                        assert current is not None
                        current.attempts += 1
                        try:
                            # Another thread may win before the update or before the commit.
                            await uow.repo(Operation).update(current)
                            await uow.commit()
                            break
                        except StaleVersion:
                            continue

        try:
            asyncio.run(run())
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []

    async def totals() -> tuple[int, int]:
        async with storage.unit_of_work() as uow:
            counter = await uow.repo(Operation).get("op-0001")
            assert counter is not None
            return await uow.repo(Operation).count(), counter.attempts

    assert asyncio.run(totals()) == (401, 400)


def test_optional_filters_drop_only_the_conditions_not_given() -> None:
    kept = given(Where.eq("status", None), Where.eq("attempts", 0), Where.eq("enabled", False))

    assert kept == [Where.eq("attempts", 0), Where.eq("enabled", False)]


async def test_summarize_gives_exact_moments_and_interpolated_quantiles_per_group(
    storage: Storage,
) -> None:
    from app.experiments.entities import Experiment, ExperimentRecord, RecordSource

    latencies = {"a": [120, 80, 100, 95, 3_000_000_000], "b": [7]}
    scores = {"a": [0.5, None, 0.25, None, 1.0], "b": [None]}
    async with storage.unit_of_work() as uow:
        await create(uow, Experiment, id="exp")
        n = 0
        for variant, values in latencies.items():
            for i, latency in enumerate(values):
                n += 1
                await uow.repo(ExperimentRecord).add(
                    build(
                        ExperimentRecord,
                        id=f"r{n}",
                        experiment_id="exp",
                        variant_id=variant,
                        source=RecordSource.LIVE,
                        operation_id=None,
                        item_id=None,
                        cost_micros=latency,  # a BigInteger: its square is past 64 bits
                        latency_ms=latency % 1000,
                        unit=f"u{i % 2}" if variant == "a" else None,
                        success=i % 2 == 0,
                        feedback_score=scores[variant][i],
                    )
                )
        # Left out by the condition.
        await uow.repo(ExperimentRecord).add(
            build(
                ExperimentRecord,
                id="offline",
                experiment_id="exp",
                variant_id="a",
                source=RecordSource.OFFLINE,
                latency_ms=999,
            )
        )
        await uow.commit()
    async with storage.unit_of_work() as uow:
        repo = uow.repo(ExperimentRecord)
        groups = await repo.summarize(
            "variant_id",
            ["cost_micros", "latency_ms", "success", "feedback_score"],
            Where.eq("source", RecordSource.LIVE),
            quantiles={"latency_ms": [0.0, 0.5, 0.95, 1.0], "feedback_score": [0.5]},
            distinct=["unit"],
        )
        none = await repo.summarize("variant_id", ["latency_ms"], Where.eq("experiment_id", "x"))
        with pytest.raises(ValueError):
            await repo.summarize("variant_id", ["error"])
    a, b = groups["a"], groups["b"]
    assert set(groups) == {"a", "b"} and a.count == 5 and b.count == 1
    costs = latencies["a"]
    assert a.moments["cost_micros"] == Moments(
        5, sum(costs), sum(c * c for c in costs), 80, 3_000_000_000
    )
    assert type(a.moments["cost_micros"].squares) is int
    # latency_ms: 120, 80, 100, 95, 0 (3e9 % 1000)
    assert a.moments["latency_ms"] == Moments(5, 395, 120**2 + 80**2 + 100**2 + 95**2, 0, 120)
    assert a.moments["success"] == Moments(5, 3, 3, 0, 1)
    score = a.moments["feedback_score"]
    assert (score.n, score.total, score.squares) == (3, 1.75, 0.25 + 0.0625 + 1.0)
    # Sorted 0, 80, 95, 100, 120: 0.95 lies at rank 3.8, between 100 and 120.
    assert a.quantiles["latency_ms"] == [0.0, 95.0, pytest.approx(116.0), 120.0]
    assert a.quantiles["feedback_score"] == [0.5]
    assert b.moments["feedback_score"] == Moments()
    assert b.quantiles == {"latency_ms": [7.0, 7.0, 7.0, 7.0], "feedback_score": [None]}
    assert a.distinct == {"unit": 2} and b.distinct == {"unit": 0}
    assert none == {}

"""Group commit: concurrent inserts share rounds, and each caller gets its own outcome."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from app.core.errors import DuplicateKey, Unavailable
from app.operations.entities import Operation
from app.storage.grouped import GroupInsert
from app.storage.protocol import Storage
from tests.storage.test_contract import op


class CountingGroupInsert(GroupInsert[Operation]):
    """Records the size of every round it writes."""

    def __init__(self, storage: Storage) -> None:
        super().__init__(storage, Operation)
        self.rounds: list[int] = []

    async def _insert(self, entities: Sequence[Operation]) -> list[BaseException | None]:
        self.rounds.append(len(entities))
        return await super()._insert(entities)


async def stored_ids(storage: Storage) -> list[str]:
    async with storage.unit_of_work() as uow:
        return sorted(o.id for o in (await uow.repo(Operation).find()).items)


async def test_concurrent_inserts_are_all_committed_in_fewer_rounds(storage: Storage) -> None:
    inserts = CountingGroupInsert(storage)
    await asyncio.gather(*(inserts.add(op(n)) for n in range(40)))
    assert await stored_ids(storage) == [f"op-{n:04d}" for n in range(40)]
    assert sum(inserts.rounds) == 40
    assert len(inserts.rounds) < 40, "callers waiting together should share a round"


async def test_a_lone_insert_is_written_at_once(storage: Storage) -> None:
    inserts = CountingGroupInsert(storage)
    await inserts.add(op(1))
    assert inserts.rounds == [1]
    assert await stored_ids(storage) == ["op-0001"]


async def test_a_taken_key_fails_only_its_own_caller(storage: Storage) -> None:
    inserts = CountingGroupInsert(storage)
    await inserts.add(op(3))
    outcomes = await asyncio.gather(*(inserts.add(op(n)) for n in range(6)), return_exceptions=True)
    assert [type(o).__name__ for o in outcomes] == [
        "NoneType",
        "NoneType",
        "NoneType",
        "DuplicateKey",
        "NoneType",
        "NoneType",
    ]
    assert isinstance(outcomes[3], DuplicateKey)
    assert await stored_ids(storage) == [f"op-{n:04d}" for n in range(6)]


async def test_a_caller_that_goes_away_still_has_its_insert_committed(storage: Storage) -> None:
    inserts = GroupInsert(storage, Operation)
    caller = asyncio.create_task(inserts.add(op(7)))
    await asyncio.sleep(0)  # its round has started
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    for _ in range(200):
        if await stored_ids(storage):
            break
        await asyncio.sleep(0.01)
    assert await stored_ids(storage) == ["op-0007"]


async def test_when_storage_fails_every_caller_of_the_round_gets_the_error(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    def down(**_: Any) -> Any:
        raise Unavailable("database unreachable (fake)")

    monkeypatch.setattr(storage, "unit_of_work", down)
    inserts = GroupInsert(storage, Operation)
    outcomes = await asyncio.gather(*(inserts.add(op(n)) for n in range(3)), return_exceptions=True)
    assert all(isinstance(o, Unavailable) for o in outcomes)
    monkeypatch.undo()
    await inserts.add(op(9))  # storage is back: the next round goes through
    assert await stored_ids(storage) == ["op-0009"]


async def test_with_rounds_in_flight_a_caller_does_not_wait_for_a_round_it_is_not_in(
    storage: Storage,
) -> None:
    release = asyncio.Event()
    started: list[list[str]] = []

    class Slow(GroupInsert[Operation]):
        async def _insert(self, entities: Sequence[Operation]) -> list[BaseException | None]:
            started.append([e.id for e in entities])
            if entities[0].id == "op-0001":
                await release.wait()  # the first round hangs...
            return await super()._insert(entities)

    inserts = Slow(storage, Operation, in_flight=2)
    first = asyncio.create_task(inserts.add(op(1)))
    await asyncio.sleep(0)
    await asyncio.wait_for(inserts.add(op(2)), timeout=5)  # ... the second goes through
    third, fourth = inserts.add(op(3)), inserts.add(op(4))
    done = asyncio.gather(third, fourth)
    await asyncio.sleep(0.05)
    assert not first.done()
    release.set()
    await asyncio.wait_for(asyncio.gather(first, done), timeout=5)
    assert started[:2] == [["op-0001"], ["op-0002"]]
    assert sorted(i for r in started for i in r) == [f"op-{n:04d}" for n in range(1, 5)]
    assert await stored_ids(storage) == [f"op-{n:04d}" for n in range(1, 5)]


async def test_then_gets_each_rounds_committed_entities_before_their_callers_return(
    storage: Storage,
) -> None:
    seen: list[list[str]] = []

    async def then(entities: list[Operation]) -> None:
        stored = await stored_ids(storage)
        assert all(e.id in stored for e in entities), "then ran before the commit"
        seen.append(sorted(e.id for e in entities))

    inserts = GroupInsert(storage, Operation, then=then)
    await inserts.add(op(3))
    outcomes = await asyncio.gather(*(inserts.add(op(n)) for n in range(6)), return_exceptions=True)
    assert isinstance(outcomes[3], DuplicateKey)  # the taken key is left out of `then`
    assert sorted(i for r in seen for i in r) == [f"op-{n:04d}" for n in range(6)]
    assert seen[0] == ["op-0003"]


async def test_a_then_that_fails_does_not_fail_the_callers_whose_rows_are_committed(
    storage: Storage,
) -> None:
    async def broken(entities: list[Operation]) -> None:
        raise RuntimeError("the broker went away (fake)")

    inserts = GroupInsert(storage, Operation, then=broken)
    await asyncio.gather(*(inserts.add(op(n)) for n in range(3)))
    assert await stored_ids(storage) == [f"op-{n:04d}" for n in range(3)]

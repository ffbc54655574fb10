"""Status changes go through the transition table, including the runner's conditional writes."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping
from typing import Any

import pytest

from app.core.errors import IllegalTransition, Transient
from app.operations.entities import OperationStatus
from app.operations.runner import JobContext, JobTimings, OperationRunner
from app.operations.service import OperationService
from app.operations.submit import Owner
from app.operations.transitions import TRANSITIONS, transition
from app.queue.names import OperationKind
from app.storage.memory import MemoryRepository
from app.storage.protocol import Op, Storage, Where
from app.storage.sql import SqlRepository
from tests.fakes import RecordingQueue

P, R, C, F, X = (
    OperationStatus.PENDING,
    OperationStatus.RUNNING,
    OperationStatus.COMPLETED,
    OperationStatus.FAILED,
    OperationStatus.CANCELLED,
)
PAIRS = [(a, b) for a in OperationStatus for b in OperationStatus]
ALLOWED = [(a, b) for a, b in PAIRS if b in TRANSITIONS[a]]
FORBIDDEN = [(a, b) for a, b in PAIRS if b not in TRANSITIONS[a]]


@pytest.mark.parametrize(("source", "target"), FORBIDDEN)
def test_a_transition_the_table_forbids_cannot_be_built(
    source: OperationStatus, target: OperationStatus
) -> None:
    with pytest.raises(IllegalTransition, match=f"from {source.value} to {target.value}"):
        transition(source, target)


@pytest.mark.parametrize(("source", "target"), ALLOWED)
def test_an_allowed_transition_is_a_compare_and_set_on_the_status(
    source: OperationStatus, target: OperationStatus
) -> None:
    step = transition(source, target)
    assert step.where == Where.eq("status", source)
    assert dict(step.changes) == {"status": target}
    with pytest.raises(TypeError):
        step.changes["status"] = C  # type: ignore[index]


@pytest.mark.parametrize(("source", "target"), [(P, R), (R, C), (R, F), (R, P)])
def test_the_runner_does_not_load_with_a_table_that_forbids_one_of_its_moves(
    monkeypatch: pytest.MonkeyPatch, source: OperationStatus, target: OperationStatus
) -> None:
    monkeypatch.setitem(TRANSITIONS, source, TRANSITIONS[source] - {target})
    monkeypatch.delitem(sys.modules, "app.operations.runner")
    with pytest.raises(IllegalTransition, match=f"from {source.value} to {target.value}"):
        importlib.import_module("app.operations.runner")


async def test_every_status_the_runner_writes_conditionally_is_a_legal_move(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    moves: set[tuple[OperationStatus, OperationStatus]] = set()

    def recording(original: Any) -> Any:
        async def write(self: Any, id_: Any, changes: Mapping[str, Any], *where: Where) -> Any:
            if "status" in changes:
                (expected,) = [w.value for w in where if w.field == "status" and w.op is Op.EQ]
                moves.add((OperationStatus(expected), OperationStatus(changes["status"])))
            return await original(self, id_, changes, *where)

        return write

    for repository in (MemoryRepository, SqlRepository):
        for name in ("update_where", "write_where"):
            monkeypatch.setattr(repository, name, recording(getattr(repository, name)))

    tries: dict[str, int] = {}

    async def flaky_then_fine(ctx: JobContext) -> str:
        verdict = ctx.operation.input["verdict"]
        tries[ctx.operation.id] = tries.get(ctx.operation.id, 0) + 1
        if verdict == "bad":
            raise ValueError("not this one")
        if tries[ctx.operation.id] == 1:
            raise Transient("try again")
        return "done"

    queue = RecordingQueue(storage)
    service = OperationService(storage, queue, max_attempts=3)
    runner = OperationRunner(
        storage,
        queue,
        {OperationKind.CHAT_COMPLETION: flaky_then_fine},
        timings=JobTimings(retry_base=0.0, retry_max=0.0),
    )
    owner = Owner(key_id="key-alice")
    for verdict in ("good", "bad"):
        job, _ = await service.submit(
            kind=OperationKind.CHAT_COMPLETION, input={"verdict": verdict}, owner=owner
        )
        while await runner.execute(job.id):
            pass

    assert moves == {(P, R), (R, P), (R, C), (R, F)}
    assert all(target in TRANSITIONS[source] for source, target in moves)

"""The promises of the job engine, on both storage backends, without a broker."""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from datetime import datetime, timedelta
from typing import Any

import pytest

from app.core.clock import utcnow
from app.core.errors import (
    Conflict,
    IllegalTransition,
    InvalidId,
    InvalidInput,
    NotFound,
    Transient,
)
from app.operations.entities import Operation, OperationStatus
from app.operations.runner import Handler, JobContext, JobTimings, OperationRunner
from app.operations.service import ChildSpec, OperationService
from app.operations.submit import Owner
from app.operations.transitions import TRANSITIONS, move
from app.queue.names import OperationKind
from app.storage.protocol import Storage, UnitOfWork
from app.usage.entities import UsageRecord, UsageType
from tests.fakes import RecordingQueue

ALICE = Owner(key_id="key-alice")
BOB = Owner(key_id="key-bob")
ADMIN = Owner(key_id="key-admin", admin=True)
CHAT = OperationKind.CHAT_COMPLETION
FAST = JobTimings(lease=0.5, heartbeat=0.1, retry_base=0.01, retry_max=0.05, resend_after=0.2)


@pytest.fixture
def queue(storage: Storage) -> RecordingQueue:
    return RecordingQueue(storage)


@pytest.fixture
def service(storage: Storage, queue: RecordingQueue) -> OperationService:
    return OperationService(storage, queue, max_attempts=3)


def runner_with(
    storage: Storage, queue: RecordingQueue, handler: Handler, *, worker: str = "w1"
) -> OperationRunner:
    return OperationRunner(storage, queue, {CHAT: handler}, worker_id=worker, timings=FAST)


async def load(storage: Storage, operation_id: str) -> Operation:
    async with storage.unit_of_work() as uow:
        operation = await uow.repo(Operation).get(operation_id)
    assert operation is not None
    return operation


async def echo(ctx: JobContext) -> dict[str, Any]:
    await ctx.checkpoint()
    return {"echo": ctx.operation.input}


# ---- accepted means durable; enqueue after commit -----------------------------------------


async def test_a_submitted_job_is_committed_before_it_is_sent(
    service: OperationService, queue: RecordingQueue, storage: Storage
) -> None:
    operation, created = await service.submit(kind=CHAT, input={"x": 1}, owner=ALICE)
    assert created
    assert [s.operation_id for s in queue.sent] == [operation.id]
    assert queue.sent[0].row_existed, "the message went out before the row was visible"
    stored = await load(storage, operation.id)
    assert stored.status == OperationStatus.PENDING and stored.send_count == 1


async def test_broker_down_still_accepts_and_the_sweeper_sends_later(
    service: OperationService, queue: RecordingQueue, storage: Storage
) -> None:
    queue.down = True
    operation, _ = await service.submit(kind=CHAT, input={"x": 1}, owner=ALICE)
    stored = await load(storage, operation.id)
    assert stored.status == OperationStatus.PENDING
    assert stored.enqueued_at is None, "a failed send must be visible to the sweeper"
    runner = runner_with(storage, queue, echo)
    report = await runner.sweep()
    assert report.resent == 0 and queue.sent == []  # still down: nothing sent, nothing lost
    queue.down = False
    report = await runner.sweep()
    assert report.resent == 1 and queue.ids() == [operation.id]
    assert await runner.execute(operation.id)
    assert (await load(storage, operation.id)).status == OperationStatus.COMPLETED


async def test_a_send_lost_after_commit_is_resent_once_stale(
    service: OperationService, queue: RecordingQueue, storage: Storage
) -> None:
    operation, _ = await service.submit(kind=CHAT, input={}, owner=ALICE)
    queue.sent.clear()  # as if the message vanished (a crash between commit and send)
    runner = runner_with(storage, queue, echo)
    assert (await runner.sweep()).resent == 0  # too recent to call it lost
    await asyncio.sleep(FAST.resend_after + 0.05)
    assert (await runner.sweep()).resent == 1
    assert (await runner.sweep()).resent == 0  # backs off: not re-sent on every tick
    assert queue.ids() == [operation.id]


async def unsent(
    service: OperationService, queue: RecordingQueue, storage: Storage
) -> tuple[Operation, datetime]:
    """A job submitted whose message is then lost, and when it was enqueued."""
    operation, _ = await service.submit(kind=CHAT, input={}, owner=ALICE)
    queue.sent.clear()
    stored = await load(storage, operation.id)
    assert stored.enqueued_at is not None
    return operation, stored.enqueued_at


async def test_a_job_waiting_in_a_backlog_is_not_resent_until_its_queue_moves_past_it(
    service: OperationService, queue: RecordingQueue, storage: Storage
) -> None:
    operation, enqueued_at = await unsent(service, queue, storage)
    runner = runner_with(storage, queue, echo)
    await asyncio.sleep(FAST.resend_after + 0.05)  # stale by the wall clock
    # Its queue still holds a message sent before it: it waits its turn, it is not lost.
    queue.waiting = {CHAT: enqueued_at - timedelta(seconds=1)}
    assert (await runner.sweep()).resent == 0
    # Another kind's backlog says nothing about this one.
    queue.waiting = {OperationKind.WEBHOOK_DELIVERY: enqueued_at - timedelta(seconds=1)}
    assert (await runner.sweep()).resent == 1
    assert queue.ids() == [operation.id]


async def test_a_lost_send_is_resent_once_its_queue_has_moved_past_it(
    service: OperationService, queue: RecordingQueue, storage: Storage
) -> None:
    operation, enqueued_at = await unsent(service, queue, storage)
    runner = runner_with(storage, queue, echo)
    await asyncio.sleep(FAST.resend_after * 2 + 0.05)
    # The oldest message still queued was sent after it, but not resend_after after it yet.
    queue.waiting = {CHAT: enqueued_at + timedelta(seconds=FAST.resend_after / 2)}
    assert (await runner.sweep()).resent == 0
    queue.waiting = {CHAT: enqueued_at + timedelta(seconds=FAST.resend_after * 1.5)}
    assert (await runner.sweep()).resent == 1
    assert queue.ids() == [operation.id]


async def test_stale_sends_are_judged_by_the_clock_when_the_broker_cannot_say(
    service: OperationService, queue: RecordingQueue, storage: Storage
) -> None:
    operation, _ = await unsent(service, queue, storage)
    runner = runner_with(storage, queue, echo)
    await asyncio.sleep(FAST.resend_after + 0.05)

    async def unreadable() -> dict[OperationKind, Any]:
        raise ConnectionError("redis went away")

    queue.waiting_since = unreadable  # type: ignore[method-assign]
    assert (await runner.sweep()).resent == 1
    assert queue.ids() == [operation.id]


# ---- claims, duplicates, leases -------------------------------------------------------------


async def test_duplicate_deliveries_execute_once(
    service: OperationService, queue: RecordingQueue, storage: Storage
) -> None:
    calls: list[str] = []

    async def counting(ctx: JobContext) -> str:
        calls.append(ctx.operation.id)
        await asyncio.sleep(0.02)
        return "done"

    operation, _ = await service.submit(kind=CHAT, input={}, owner=ALICE)
    runners = [runner_with(storage, queue, counting, worker=f"w{i}") for i in range(4)]
    outcomes = await asyncio.gather(*(r.execute(operation.id) for r in runners))
    assert sorted(outcomes) == [False, False, False, True]
    assert await runners[0].execute(operation.id) is False  # a late duplicate
    assert calls == [operation.id]
    stored = await load(storage, operation.id)
    assert stored.status == OperationStatus.COMPLETED and stored.result == "done"
    assert stored.attempts == 1 and len(stored.attempt_log) == 1


async def test_a_worker_that_lost_its_lease_cannot_write_its_result(
    service: OperationService, queue: RecordingQueue, storage: Storage
) -> None:
    operation, _ = await service.submit(kind=CHAT, input={}, owner=ALICE)
    slow = runner_with(storage, queue, echo, worker="slow")
    claimed = await slow.claim(operation.id)
    assert claimed is not None
    claimed_operation, stale_claim = claimed
    await asyncio.sleep(FAST.lease + 0.05)  # the slow worker stops heart-beating
    assert (await slow.sweep()).recovered == 1
    fresh = runner_with(storage, queue, lambda ctx: _value("fresh"), worker="fresh")
    assert await fresh.execute(operation.id)
    assert await slow._complete(claimed_operation, stale_claim, "stale") is False
    stored = await load(storage, operation.id)
    assert stored.result == "fresh" and stored.status == OperationStatus.COMPLETED
    assert [e["outcome"] for e in stored.attempt_log] == ["lost", "completed"]
    assert stored.attempts == 2


async def _value(value: Any) -> Any:
    return value


async def test_heartbeats_keep_a_long_job_leased(
    service: OperationService, queue: RecordingQueue, storage: Storage
) -> None:
    async def long(ctx: JobContext) -> str:
        await asyncio.sleep(FAST.lease * 3)
        return "long"

    operation, _ = await service.submit(kind=CHAT, input={}, owner=ALICE)
    runner = runner_with(storage, queue, long)
    task = asyncio.create_task(runner.execute(operation.id))
    for _ in range(6):
        await asyncio.sleep(FAST.lease / 2)
        assert (await runner.sweep()).recovered == 0
    await task
    stored = await load(storage, operation.id)
    assert stored.status == OperationStatus.COMPLETED and stored.attempts == 1


async def test_a_job_whose_worker_keeps_dying_fails_after_max_attempts(
    service: OperationService, queue: RecordingQueue, storage: Storage
) -> None:
    operation, _ = await service.submit(kind=CHAT, input={}, owner=ALICE)
    runner = runner_with(storage, queue, echo)
    for _ in range(3):
        assert await runner.claim(operation.id) is not None  # ... and the worker dies
        await asyncio.sleep(FAST.lease + 0.05)
        await runner.sweep()
    stored = await load(storage, operation.id)
    assert stored.status == OperationStatus.FAILED
    assert stored.error_type == "max_attempts_exceeded"
    assert "3 of 3 attempts" in (stored.error_message or "")
    assert [e["outcome"] for e in stored.attempt_log] == ["lost", "lost", "lost"]
    assert await runner.execute(operation.id) is False


# ---- retries ----------------------------------------------------------------------------------


async def test_transient_failures_retry_with_backoff_then_fail_clearly(
    service: OperationService, queue: RecordingQueue, storage: Storage
) -> None:
    async def flaky(ctx: JobContext) -> None:
        raise Transient("upstream answered 503")

    operation, _ = await service.submit(kind=CHAT, input={}, owner=ALICE)
    runner = runner_with(storage, queue, flaky)
    queue.sent.clear()
    assert await runner.execute(operation.id)
    stored = await load(storage, operation.id)
    assert stored.status == OperationStatus.PENDING and stored.run_after is not None
    assert queue.sent[-1].operation_id == operation.id and queue.sent[-1].delay > 0
    for _ in range(2):
        assert await runner.execute(operation.id)
    stored = await load(storage, operation.id)
    assert stored.status == OperationStatus.FAILED
    assert stored.error_type == "transient_failure"
    assert "gave up after 3 attempts" in (stored.error_message or "")
    assert [e["outcome"] for e in stored.attempt_log] == ["failed"] * 3
    assert all(e["transient"] for e in stored.attempt_log)


async def test_a_transient_failure_then_success_completes(
    service: OperationService, queue: RecordingQueue, storage: Storage
) -> None:
    attempts: list[int] = []

    async def once_flaky(ctx: JobContext) -> str:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            raise TimeoutError
        return "ok"

    operation, _ = await service.submit(kind=CHAT, input={}, owner=ALICE)
    runner = runner_with(storage, queue, once_flaky)
    await runner.execute(operation.id)
    await runner.execute(operation.id)
    stored = await load(storage, operation.id)
    assert attempts == [1, 2]
    assert stored.status == OperationStatus.COMPLETED and stored.result == "ok"
    assert stored.attempt_log[0]["error"].startswith("timeout")


async def test_permanent_failures_fail_at_once(
    service: OperationService, queue: RecordingQueue, storage: Storage
) -> None:
    async def refused(ctx: JobContext) -> None:
        raise InvalidInput("messages[0].content is too long", param="messages")

    operation, _ = await service.submit(kind=CHAT, input={}, owner=ALICE)
    await runner_with(storage, queue, refused).execute(operation.id)
    stored = await load(storage, operation.id)
    assert stored.status == OperationStatus.FAILED and stored.attempts == 1
    assert stored.error_type == "invalid_request"
    assert stored.error_message == "messages[0].content is too long"


async def test_a_result_that_cannot_be_stored_fails_the_job_once_instead_of_rerunning_it(
    service: OperationService, queue: RecordingQueue, storage: Storage
) -> None:
    runs: list[int] = []

    async def unstorable(ctx: JobContext) -> dict[str, Any]:
        runs.append(ctx.attempt)
        return {"answer": object()}  # no JSON for it, on either backend

    operation, _ = await service.submit(kind=CHAT, input={}, owner=ALICE)
    runner = runner_with(storage, queue, unstorable)
    assert await runner.execute(operation.id)
    stored = await load(storage, operation.id)
    assert stored.status == OperationStatus.FAILED and stored.attempts == 1
    assert stored.error_type == "result_not_storable"
    assert stored.lease_token is None and stored.result is None
    assert await runner.execute(operation.id) is False and runs == [1]


async def test_unexpected_errors_do_not_leak_their_text(
    service: OperationService, queue: RecordingQueue, storage: Storage
) -> None:
    async def buggy(ctx: JobContext) -> None:
        raise KeyError("sk-secret-value")

    operation, _ = await service.submit(kind=CHAT, input={}, owner=ALICE)
    await runner_with(storage, queue, buggy).execute(operation.id)
    stored = await load(storage, operation.id)
    assert stored.status == OperationStatus.FAILED
    assert "sk-secret" not in str(stored.error_message) + str(stored.attempt_log)


# ---- cancellation -------------------------------------------------------------------------------


async def test_a_cancelled_pending_job_never_runs(
    service: OperationService, queue: RecordingQueue, storage: Storage
) -> None:
    operation, _ = await service.submit(kind=CHAT, input={}, owner=ALICE)
    cancelled = await service.cancel(operation.id, owner=ALICE)
    assert cancelled.status == OperationStatus.CANCELLED
    assert await runner_with(storage, queue, echo).execute(operation.id) is False
    assert (await load(storage, operation.id)).status == OperationStatus.CANCELLED


async def test_a_running_job_stops_at_its_next_checkpoint_and_is_never_completed(
    service: OperationService, queue: RecordingQueue, storage: Storage
) -> None:
    started = asyncio.Event()
    steps: list[int] = []

    async def stepwise(ctx: JobContext) -> str:
        for step in range(50):
            await ctx.checkpoint()
            steps.append(step)
            started.set()
            await asyncio.sleep(0.02)
        return "finished"

    operation, _ = await service.submit(kind=CHAT, input={}, owner=ALICE)
    task = asyncio.create_task(runner_with(storage, queue, stepwise).execute(operation.id))
    await started.wait()
    await service.cancel(operation.id, owner=ALICE)
    await asyncio.wait_for(task, timeout=5)
    assert len(steps) < 50
    stored = await load(storage, operation.id)
    assert stored.status == OperationStatus.CANCELLED and stored.result is None


async def test_finished_jobs_cannot_be_cancelled(
    service: OperationService, queue: RecordingQueue, storage: Storage
) -> None:
    operation, _ = await service.submit(kind=CHAT, input={}, owner=ALICE)
    await runner_with(storage, queue, echo).execute(operation.id)
    with pytest.raises(Conflict):
        await service.cancel(operation.id, owner=ALICE)


# ---- writes that commit with the outcome (a job's usage) -------------------------------------


# How a handler has a row commit with its outcome: a write of its own, the row alone (in the
# outcome's statement), or the row and a write told which rows were new (a budget's charge).
CARRIED = ["write", "rows", "rows-then"]


@pytest.fixture(params=CARRIED)
def carry(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def write_record(ctx: JobContext, record_id: str, carry: str = "write") -> None:
    """Have a usage record commit with the attempt's outcome, as a job's calls do; with
    `rows-then`, a second record `<id>-charged` follows it once it is known to be new."""
    record = UsageRecord(
        id=record_id, usage_type=UsageType.CHAT_COMPLETION, operation_id=ctx.operation.id
    )
    if carry == "write":

        async def write(uow: UnitOfWork) -> None:
            await uow.repo(UsageRecord).add_missing([record])

        ctx.write_with_outcome(write)
        return
    if carry == "rows":
        ctx.add_with_outcome([record])
        return

    async def charge(uow: UnitOfWork, new: Collection[Any]) -> None:
        assert list(new) == [record_id]
        charged = UsageRecord(id=f"{record_id}-charged", usage_type=UsageType.CHAT_COMPLETION)
        await uow.repo(UsageRecord).add(charged)

    ctx.add_with_outcome([record], charge)


def with_charges(carry: str, *ids: str) -> list[str]:
    """The records `write_record` leaves for `ids`."""
    charged = [f"{i}-charged" for i in ids] if carry == "rows-then" else []
    return sorted([*ids, *charged])


async def record_ids(storage: Storage) -> list[str]:
    async with storage.unit_of_work() as uow:
        return sorted(r.id for r in (await uow.repo(UsageRecord).find()).items)


async def test_writes_made_with_the_outcome_commit_with_the_completed_job(
    service: OperationService, queue: RecordingQueue, storage: Storage, carry: str
) -> None:
    async def paid(ctx: JobContext) -> str:
        write_record(ctx, "usage-1", carry)
        assert await record_ids(storage) == []  # not before the outcome
        return "done"

    operation, _ = await service.submit(kind=CHAT, input={}, owner=ALICE)
    assert await runner_with(storage, queue, paid).execute(operation.id)
    assert (await load(storage, operation.id)).status == OperationStatus.COMPLETED
    assert await record_ids(storage) == with_charges(carry, "usage-1")


async def test_the_writes_of_a_worker_that_died_never_commit_and_the_rerun_writes_its_own(
    service: OperationService, queue: RecordingQueue, storage: Storage, carry: str
) -> None:
    operation, _ = await service.submit(kind=CHAT, input={}, owner=ALICE)
    dead = runner_with(storage, queue, echo, worker="dead")
    claimed = await dead.claim(operation.id)
    assert claimed is not None
    write_record(JobContext(dead, *claimed), "usage-dead", carry)  # ... and the worker dies
    await asyncio.sleep(FAST.lease + 0.05)
    assert (await dead.sweep()).recovered == 1

    async def rerun(ctx: JobContext) -> str:
        write_record(ctx, "usage-rerun", carry)
        return "done"

    assert await runner_with(storage, queue, rerun, worker="fresh").execute(operation.id)
    assert await dead._complete(claimed[0], claimed[1], "late") is False  # woke up too late
    assert await record_ids(storage) == with_charges(carry, "usage-rerun")


async def test_a_failed_attempt_commits_its_writes_with_the_retry(
    service: OperationService, queue: RecordingQueue, storage: Storage, carry: str
) -> None:
    async def paid_then_flaky(ctx: JobContext) -> str:
        write_record(ctx, f"usage-{ctx.attempt}", carry)
        if ctx.attempt == 1:
            raise Transient("upstream answered 503 after a call that counted")
        return "ok"

    operation, _ = await service.submit(kind=CHAT, input={}, owner=ALICE)
    runner = runner_with(storage, queue, paid_then_flaky)
    await runner.execute(operation.id)
    assert (await load(storage, operation.id)).status == OperationStatus.PENDING
    assert await record_ids(storage) == with_charges(carry, "usage-1")
    await runner.execute(operation.id)
    assert (await load(storage, operation.id)).status == OperationStatus.COMPLETED
    assert await record_ids(storage) == with_charges(carry, "usage-1", "usage-2")


async def test_a_job_cancelled_mid_run_still_commits_the_writes_of_its_attempt(
    service: OperationService, queue: RecordingQueue, storage: Storage, carry: str
) -> None:
    called = asyncio.Event()

    async def paid_then_stepwise(ctx: JobContext) -> str:
        write_record(ctx, "usage-before-cancel", carry)
        called.set()
        for _ in range(100):
            await asyncio.sleep(0.02)
            await ctx.checkpoint()
        return "finished"

    operation, _ = await service.submit(kind=CHAT, input={}, owner=ALICE)
    task = asyncio.create_task(
        runner_with(storage, queue, paid_then_stepwise).execute(operation.id)
    )
    await called.wait()
    await service.cancel(operation.id, owner=ALICE)
    await asyncio.wait_for(task, timeout=5)
    assert (await load(storage, operation.id)).status == OperationStatus.CANCELLED
    assert await record_ids(storage) == with_charges(carry, "usage-before-cancel")


# ---- idempotency -----------------------------------------------------------------------------


async def test_the_same_idempotency_key_and_body_return_the_same_job(
    service: OperationService, queue: RecordingQueue
) -> None:
    first, created = await service.submit(
        kind=CHAT, input={"m": 1}, owner=ALICE, idempotency_key="k1"
    )
    again, created_again = await service.submit(
        kind=CHAT, input={"m": 1}, owner=ALICE, idempotency_key="k1"
    )
    assert created and not created_again and again.id == first.id
    assert queue.ids() == [first.id]
    with pytest.raises(Conflict):
        await service.submit(kind=CHAT, input={"m": 2}, owner=ALICE, idempotency_key="k1")
    other, created_other = await service.submit(
        kind=CHAT, input={"m": 1}, owner=BOB, idempotency_key="k1"
    )
    assert created_other and other.id != first.id  # keys are per owner


async def test_concurrent_submissions_with_one_key_make_one_job(
    service: OperationService, storage: Storage
) -> None:
    results = await asyncio.gather(
        *(
            service.submit(kind=CHAT, input={"m": 1}, owner=ALICE, idempotency_key="race")
            for _ in range(8)
        )
    )
    assert len({op.id for op, _ in results}) == 1
    assert sum(created for _, created in results) == 1


# ---- parents and children --------------------------------------------------------------------


async def test_a_parent_finishes_when_its_last_child_does_with_counts(
    service: OperationService, queue: RecordingQueue, storage: Storage
) -> None:
    async def by_input(ctx: JobContext) -> str:
        if ctx.operation.input.get("fail"):
            raise InvalidInput("bad line")
        return "ok"

    parent = await service.submit_parent(
        kind=OperationKind.BATCH,
        input={"file": "f-1"},
        owner=ALICE,
        children=[ChildSpec(CHAT, {"n": i, "fail": i == 3}) for i in range(5)],
    )
    assert parent.status == OperationStatus.RUNNING
    children = await service.list(owner=ALICE, parent_id=parent.id, limit=10)
    assert len(children.items) == 5 and set(queue.ids()) == {c.id for c in children.items}
    runners = [runner_with(storage, queue, by_input, worker=f"w{i}") for i in range(3)]
    await asyncio.gather(*(runners[i % 3].execute(c.id) for i, c in enumerate(children.items)))
    stored = await load(storage, parent.id)
    assert stored.status == OperationStatus.COMPLETED
    assert stored.result == {"total": 5, "completed": 4, "failed": 1, "cancelled": 0}
    assert stored.progress == {"completed": 5, "total": 5}


async def test_the_writes_of_children_commit_with_their_outcome_and_the_parents_count(
    service: OperationService, queue: RecordingQueue, storage: Storage, carry: str
) -> None:
    async def paid(ctx: JobContext) -> str:
        write_record(ctx, f"usage-{ctx.operation.input['n']}", carry)
        if ctx.operation.input["n"] == 1:
            raise InvalidInput("bad line")  # a failed line was paid for too
        return "ok"

    parent = await service.submit_parent(
        kind=OperationKind.BATCH,
        input={"file": "f-1"},
        owner=ALICE,
        children=[ChildSpec(CHAT, {"n": i}) for i in range(3)],
    )
    children = await service.list(owner=ALICE, parent_id=parent.id, limit=10)
    runner = runner_with(storage, queue, paid)
    await asyncio.gather(*(runner.execute(c.id) for c in children.items))
    stored = await load(storage, parent.id)
    assert stored.result == {"total": 3, "completed": 2, "failed": 1, "cancelled": 0}
    assert await record_ids(storage) == with_charges(carry, "usage-0", "usage-1", "usage-2")


async def test_cancelling_a_parent_cancels_its_unfinished_children(
    service: OperationService, queue: RecordingQueue, storage: Storage
) -> None:
    parent = await service.submit_parent(
        kind=OperationKind.BATCH,
        input={},
        owner=ALICE,
        children=[ChildSpec(CHAT, {"n": i}) for i in range(3)],
    )
    children = (await service.list(owner=ALICE, parent_id=parent.id)).items
    await runner_with(storage, queue, echo).execute(children[0].id)
    cancelled = await service.cancel(parent.id, owner=ALICE)
    assert cancelled.status == OperationStatus.CANCELLED
    assert cancelled.children_completed == 1 and cancelled.children_cancelled == 2
    for child in children[1:]:
        assert await runner_with(storage, queue, echo).execute(child.id) is False


async def test_a_windowed_parent_keeps_that_many_children_sent_and_sends_one_as_each_ends(
    service: OperationService, queue: RecordingQueue, storage: Storage
) -> None:
    parent = await service.submit_parent(
        kind=OperationKind.BATCH,
        input={},
        owner=ALICE,
        children=[ChildSpec(CHAT, {"n": i}) for i in range(5)],
        window=2,
    )
    children = {
        c.input["n"]: c for c in (await service.list(owner=ALICE, parent_id=parent.id)).items
    }
    assert queue.ids() == [children[0].id, children[1].id]
    assert all(children[n].send_count == 0 for n in (2, 3, 4))  # held
    # The sweeper leaves held children alone: they are not lost messages.
    queue.sent.clear()
    await asyncio.sleep(FAST.resend_after * 1.5)
    await runner_with(storage, queue, echo).sweep()
    assert set(queue.ids()) == {children[0].id, children[1].id}  # the stale sends, not the held
    queue.sent.clear()

    runner = runner_with(storage, queue, echo)
    order: list[int] = []
    pending = [children[0].id, children[1].id]
    while pending:
        operation_id = pending.pop(0)
        order.append((await load(storage, operation_id)).input["n"])
        await runner.execute(operation_id)
        pending += queue.ids()
        queue.sent.clear()
    assert order == [0, 1, 2, 3, 4]  # each finished child sent the next, in order
    stored = await load(storage, parent.id)
    assert stored.status == OperationStatus.COMPLETED and stored.children_sent == 5


async def test_a_child_cancelled_alone_passes_its_turn_and_a_held_one_is_skipped(
    service: OperationService, queue: RecordingQueue, storage: Storage
) -> None:
    parent = await service.submit_parent(
        kind=OperationKind.BATCH,
        input={},
        owner=ALICE,
        children=[ChildSpec(CHAT, {"n": i}) for i in range(4)],
        window=1,
    )
    children = {
        c.input["n"]: c for c in (await service.list(owner=ALICE, parent_id=parent.id)).items
    }
    queue.sent.clear()
    await service.cancel(children[2].id, owner=ALICE)  # held: it frees no place
    assert queue.ids() == []
    await service.cancel(children[0].id, owner=ALICE)  # sent: its place goes to the next
    assert queue.ids() == [children[1].id]
    queue.sent.clear()
    await runner_with(storage, queue, echo).execute(children[1].id)
    assert queue.ids() == [children[3].id]  # the cancelled held one is passed over
    await runner_with(storage, queue, echo).execute(children[3].id)
    stored = await load(storage, parent.id)
    assert stored.status == OperationStatus.COMPLETED
    assert stored.result == {"total": 4, "completed": 2, "failed": 0, "cancelled": 2}


async def test_a_parent_that_runs_after_its_children_sees_their_labels_and_runs_once(
    service: OperationService, queue: RecordingQueue, storage: Storage
) -> None:
    async def child_or_summary(ctx: JobContext) -> Any:
        if ctx.operation.parent_id is None:
            return {"summary": ctx.operation.progress}
        ctx.count_as("even" if ctx.operation.input["n"] % 2 == 0 else "odd")
        return "ok"

    parent = await service.submit_parent(
        kind=CHAT,
        input={},
        owner=ALICE,
        children=[ChildSpec(CHAT, {"n": i}) for i in range(3)],
        window=3,
        runs_after_children=True,
    )
    runner = runner_with(storage, queue, child_or_summary)
    children = (await service.list(owner=ALICE, parent_id=parent.id)).items
    queue.sent.clear()
    await asyncio.gather(*(runner.execute(c.id) for c in children))
    waiting = await load(storage, parent.id)
    assert waiting.status == OperationStatus.PENDING and queue.ids() == [parent.id]
    assert waiting.progress == {"completed": 3, "total": 3, "even": 2, "odd": 1}
    assert await runner.execute(parent.id) is True
    assert await runner.execute(parent.id) is False  # a second delivery finds it done
    done = await load(storage, parent.id)
    assert done.status == OperationStatus.COMPLETED and done.attempts == 1
    assert done.result == {"summary": {"completed": 3, "total": 3, "even": 2, "odd": 1}}


# ---- visibility, ids, listing ----------------------------------------------------------------


async def test_owners_see_only_their_own_jobs(service: OperationService) -> None:
    mine, _ = await service.submit(kind=CHAT, input={}, owner=ALICE)
    with pytest.raises(NotFound):
        await service.get(mine.id, owner=BOB)
    assert (await service.get(mine.id, owner=ADMIN)).id == mine.id
    assert await service.get_many([mine.id], owner=BOB) == []
    with pytest.raises(NotFound):
        await service.cancel(mine.id, owner=BOB)
    with pytest.raises(InvalidId):
        await service.get("not-an-op-id", owner=ALICE)


async def test_listing_filters_and_pages_without_repeats(service: OperationService) -> None:
    ids = [(await service.submit(kind=CHAT, input={"n": i}, owner=ALICE))[0].id for i in range(7)]
    await service.submit(kind=CHAT, input={}, owner=BOB)
    await service.cancel(ids[0], owner=ALICE)
    seen: list[str] = []
    cursor = None
    while True:
        page = await service.list(owner=ALICE, limit=3, after=cursor)
        seen += [o.id for o in page.items]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert sorted(seen) == sorted(ids)
    cancelled = await service.list(owner=ALICE, status=OperationStatus.CANCELLED)
    assert [o.id for o in cancelled.items] == [ids[0]]
    everyone = await service.list(owner=ADMIN, all_owners=True, limit=100)
    assert len(everyone.items) == 8


async def test_long_poll_returns_as_soon_as_the_job_finishes(
    service: OperationService, queue: RecordingQueue, storage: Storage
) -> None:
    operation, _ = await service.submit(kind=CHAT, input={}, owner=ALICE)
    waiting = asyncio.create_task(service.wait(operation.id, owner=ALICE, timeout=5))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    await runner_with(storage, queue, echo).execute(operation.id)
    done = await asyncio.wait_for(waiting, timeout=1)
    assert done.status == OperationStatus.COMPLETED
    pending, _ = await service.submit(kind=CHAT, input={"again": 1}, owner=ALICE)
    timed_out = await service.wait(pending.id, owner=ALICE, timeout=0.1)
    assert timed_out.status == OperationStatus.PENDING


# ---- admin retry, retention, transitions ------------------------------------------------------


async def test_an_administrator_can_retry_a_failed_job(
    service: OperationService, queue: RecordingQueue, storage: Storage
) -> None:
    async def refused(ctx: JobContext) -> None:
        raise InvalidInput("no")

    operation, _ = await service.submit(kind=CHAT, input={}, owner=ALICE)
    await runner_with(storage, queue, refused).execute(operation.id)
    retried = await service.retry(operation.id)
    assert retried.status == OperationStatus.PENDING and retried.error_type is None
    assert await runner_with(storage, queue, echo).execute(operation.id)
    stored = await load(storage, operation.id)
    assert stored.status == OperationStatus.COMPLETED and stored.attempts == 2
    with pytest.raises(IllegalTransition):
        await service.retry(operation.id)


async def test_retention_removes_only_old_finished_jobs(
    service: OperationService, queue: RecordingQueue, storage: Storage
) -> None:
    old, _ = await service.submit(kind=CHAT, input={"old": 1}, owner=ALICE)
    recent, _ = await service.submit(kind=CHAT, input={"recent": 1}, owner=ALICE)
    waiting, _ = await service.submit(kind=CHAT, input={"pending": 1}, owner=ALICE)
    runner = runner_with(storage, queue, echo)
    await runner.execute(old.id)
    await runner.execute(recent.id)
    async with storage.unit_of_work() as uow:
        stored = await uow.repo(Operation).get(old.id)
        assert stored is not None
        stored.finished_at = utcnow() - timedelta(days=30)
        await uow.repo(Operation).update(stored)
        await uow.commit()
    retaining = OperationRunner(storage, queue, {}, timings=JobTimings(retention=7 * 24 * 3600.0))
    assert await retaining.purge_finished() == 1
    async with storage.unit_of_work() as uow:
        left = {o.id for o in (await uow.repo(Operation).find()).items}
    assert left == {recent.id, waiting.id}


def test_the_transition_table_allows_only_the_documented_moves() -> None:
    allowed = {(a.value, b.value) for a, targets in TRANSITIONS.items() for b in targets}
    assert allowed == {
        ("pending", "running"),
        ("pending", "cancelled"),
        ("pending", "failed"),
        ("running", "completed"),
        ("running", "failed"),
        ("running", "cancelled"),
        ("running", "pending"),
        ("failed", "pending"),
    }
    done = Operation(id="op-x", kind=CHAT, status=OperationStatus.COMPLETED, queue="chat")
    with pytest.raises(IllegalTransition):
        move(done, OperationStatus.RUNNING)
    with pytest.raises(IllegalTransition):
        move(done, OperationStatus.CANCELLED)

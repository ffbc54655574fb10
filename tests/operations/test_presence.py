"""Dead workers are noticed by their heartbeat, in about a second, not by their leases: their
running jobs go back to pending at once, while a live worker's slow jobs keep their leases."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Collection, Iterator

import pytest
import redis
import redis.asyncio as aioredis

from app.operations.entities import Operation, OperationStatus
from app.operations.presence import PRESENCE_KEY, Presence, PresenceBeat
from app.operations.runner import JobTimings, OperationRunner
from app.operations.service import OperationService
from app.operations.submit import Owner
from app.queue.names import OperationKind
from app.storage.protocol import Storage
from tests.fakes import RecordingQueue

CHAT = OperationKind.CHAT_COMPLETION
LONG_LEASE = JobTimings(lease=60, heartbeat=30)


@pytest.fixture
def sync_redis(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    client.delete(PRESENCE_KEY)
    yield client
    client.delete(PRESENCE_KEY)
    client.close()


@pytest.fixture
async def async_redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.mark.redis
async def test_a_worker_that_stops_beating_is_gone_after_the_ttl_and_one_that_left_is_not(
    sync_redis: redis.Redis, async_redis: aioredis.Redis
) -> None:
    presence = Presence(async_redis, ttl=0.3)
    beating = PresenceBeat(sync_redis, "w-beating", ttl=0.3)
    dying = PresenceBeat(sync_redis, "w-dying", ttl=0.3)
    leaving = PresenceBeat(sync_redis, "w-leaving", ttl=0.3)
    for beat in (beating, dying, leaving):
        beat.start()
    try:
        assert await presence.gone(["w-beating", "w-dying", "w-leaving", "w-unknown"]) == set()
        dying._stop.set()  # killed: it beats no more and takes nothing out
        leaving.stop()  # shut down gracefully: its jobs are done, its entry is taken out
        await asyncio.sleep(0.6)
        gone = await presence.gone(["w-beating", "w-dying", "w-leaving", "w-unknown"])
        assert gone == {"w-dying"}  # an unknown or departed worker is left to its leases
    finally:
        beating.stop()
        dying.stop()


class FakePresence:
    """Workers named gone are gone; every other one is alive or unknown."""

    def __init__(self, *gone: str) -> None:
        self.ttl = 1.0
        self._gone = set(gone)
        self.asked: list[set[str]] = []

    async def gone(self, workers: Collection[str]) -> set[str]:
        self.asked.append(set(workers))
        return self._gone & set(workers)


async def load(storage: Storage, operation_id: str) -> Operation:
    async with storage.unit_of_work() as uow:
        found = await uow.repo(Operation).get(operation_id)
    assert found is not None
    return found


async def test_the_jobs_of_a_gone_worker_return_to_pending_at_once_and_live_ones_keep_theirs(
    storage: Storage,
) -> None:
    queue = RecordingQueue(storage)
    service = OperationService(storage, queue, max_attempts=3)
    owner = Owner(key_id="key-a")
    jobs = [(await service.submit(kind=CHAT, input={"n": n}, owner=owner))[0] for n in range(3)]
    for job, worker in zip(jobs, ("w-dead", "w-alive", "w-unknown"), strict=True):
        runner = OperationRunner(storage, queue, {}, worker_id=worker, timings=LONG_LEASE)
        assert await runner.claim(job.id) is not None  # a lease of a minute
    presence = FakePresence("w-dead")
    sweeper = OperationRunner(storage, queue, {}, timings=LONG_LEASE, presence=presence)
    queue.sent.clear()

    assert await sweeper.recover_orphans() == 1
    dead, alive, unknown = [await load(storage, job.id) for job in jobs]
    assert dead.status == OperationStatus.PENDING and dead.lease_token is None
    assert dead.attempt_log[-1]["outcome"] == "lost"
    assert "w-dead is gone" in dead.attempt_log[-1]["error"]
    assert queue.ids() == [dead.id]  # sent again at once
    assert alive.status == unknown.status == OperationStatus.RUNNING
    assert presence.asked == [{"w-dead", "w-alive", "w-unknown"}]
    assert (await sweeper.sweep()).recovered == 0  # their leases have not expired
    assert await sweeper.recover_orphans() == 0


async def test_a_worker_gone_on_its_last_attempt_fails_the_job(storage: Storage) -> None:
    queue = RecordingQueue(storage)
    service = OperationService(storage, queue, max_attempts=1)
    job, _ = await service.submit(kind=CHAT, input={}, owner=Owner(key_id="key-a"))
    runner = OperationRunner(storage, queue, {}, worker_id="w-dead", timings=LONG_LEASE)
    assert await runner.claim(job.id) is not None
    sweeper = OperationRunner(
        storage, queue, {}, timings=LONG_LEASE, presence=FakePresence("w-dead")
    )
    assert await sweeper.recover_orphans() == 1
    failed = await load(storage, job.id)
    assert failed.status == OperationStatus.FAILED
    assert failed.error_type == "max_attempts_exceeded"


async def test_without_presence_only_leases_decide(storage: Storage) -> None:
    queue = RecordingQueue(storage)
    service = OperationService(storage, queue)
    job, _ = await service.submit(kind=CHAT, input={}, owner=Owner(key_id="key-a"))
    runner = OperationRunner(storage, queue, {}, worker_id="w-dead", timings=LONG_LEASE)
    assert await runner.claim(job.id) is not None
    assert await OperationRunner(storage, queue, {}).recover_orphans() == 0
    assert (await load(storage, job.id)).status == OperationStatus.RUNNING

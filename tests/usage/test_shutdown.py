"""Usage records leave in batches and none is lost when a process shuts down gracefully."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path

import pytest
from dramatiq import Message
from dramatiq.brokers.stub import StubBroker

from app.config import Settings
from app.core.events import NullSink
from app.credentials.entities import Provider
from app.models.entities import Model
from app.queue.batches import DramatiqBatchSender
from app.queue.names import USAGE_ACTOR, USAGE_QUEUE
from app.storage.protocol import Storage
from app.usage.budgets import BudgetService
from app.usage.entities import UsageRecord, UsageType
from app.usage.recorder import AccountingBuffer, Batch, decode_batch, encode_batch
from app.usage.service import UsageService
from app.usage.settlement import UsageOutcome
from tests.usage.conftest import Principal
from tests.usage.test_api import app_on

MODEL = Model(
    id="priced",
    name="Priced",
    provider=Provider.MOCK,
    provider_model="mock",
    output_price_per_million=Decimal("3"),
)


@pytest.fixture(autouse=True)
def _no_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


async def count(storage: Storage) -> int:
    async with storage.unit_of_work() as uow:
        return await uow.repo(UsageRecord).count()


async def test_records_buffered_at_shutdown_are_written(storage: Storage) -> None:
    # A flush interval far longer than the test: only the shutdown can write them.
    app = app_on(storage, USAGE_FLUSH_INTERVAL_SECONDS=3600, USAGE_FLUSH_MAX_RECORDS=5000)
    async with app.router.lifespan_context(app):
        metering = app.state.services.metering

        async def one(n: int) -> None:
            admission = await metering.admit(Principal(f"key-{n % 3}"), MODEL, 5, 5)
            await metering.settle(admission, UsageOutcome(input_tokens=5, output_tokens=5))

        await asyncio.gather(*(one(n) for n in range(300)))
        assert metering.buffer.pending == 600  # a record and a log per call
        assert await count(storage) == 0
    assert await count(storage) == 300


class SlowSender:
    """Delivers batches slowly, so some are in flight when the buffer closes."""

    def __init__(self) -> None:
        self.batches: list[Batch] = []

    async def send(self, batch: Batch) -> None:
        await asyncio.sleep(0.05)
        self.batches.append(batch)


def usage(n: int) -> UsageRecord:
    return UsageRecord(id=f"usage-{n}", usage_type=UsageType.CHAT_COMPLETION, cost_micros=n)


async def test_closing_waits_for_the_batch_in_flight_and_sends_the_rest_once() -> None:
    sender = SlowSender()
    buffer = AccountingBuffer(sender, interval=0.01, max_records=50)
    for n in range(120):
        buffer.add(usage(n), None)
    await asyncio.sleep(0.02)  # the first batch is being sent
    for n in range(120, 500):
        buffer.add(usage(n), None)
    await buffer.close()
    sent = [r["id"] for batch in sender.batches for r in batch["usage"]]
    assert sorted(sent) == sorted(f"usage-{n}" for n in range(500))
    assert buffer.pending == 0


class FailingOnce:
    def __init__(self) -> None:
        self.calls = 0
        self.batches: list[Batch] = []

    async def send(self, batch: Batch) -> None:
        self.calls += 1
        if self.calls == 1:
            raise ConnectionError("broker down")
        self.batches.append(batch)


async def test_a_batch_the_queue_refused_is_kept_and_sent_later() -> None:
    sender = FailingOnce()
    buffer = AccountingBuffer(sender, interval=0.01, max_records=10)
    for n in range(5):
        buffer.add(usage(n), None)
    await asyncio.sleep(0.1)
    await buffer.close()
    assert [r["id"] for b in sender.batches for r in b["usage"]] == [f"usage-{n}" for n in range(5)]


async def test_batches_travel_as_usage_queue_messages_the_actor_can_write(
    storage: Storage,
) -> None:
    broker = StubBroker()
    await DramatiqBatchSender(broker).send(encode_batch([usage(1), usage(2)], []))
    (raw,) = broker.queues[USAGE_QUEUE].queue
    message = Message.decode(raw)
    assert message.actor_name == USAGE_ACTOR
    (batch,) = message.args
    assert [r.id for r in decode_batch(batch)[0]] == ["usage-1", "usage-2"]
    writer = UsageService(storage, BudgetService(storage, NullSink()))
    assert await writer.write_batch(batch) == 2
    assert await count(storage) == 2

"""Fixtures of the accounting tests: real Redis (flushed per test), both storage backends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pytest
import redis.asyncio as aioredis

from app.config import Settings
from app.credentials.entities import Provider
from app.models.entities import Model
from app.storage.protocol import Storage, UnitOfWork
from app.usage.ledger import CallUsage
from app.usage.wiring import Accounting, build_accounting


@dataclass(frozen=True)
class Principal:
    key_id: str
    team_id: str | None = None


@dataclass
class RecordingSink:
    """Keeps the events whose unit of work committed."""

    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    async def record(self, uow: UnitOfWork, event_type: str, data: dict[str, Any]) -> None:
        uow.on_commit(lambda: self.events.append((event_type, data)))

    async def interested(self, event_type: str) -> bool:
        return True

    def of_type(self, event_type: str) -> list[dict[str, Any]]:
        return [data for kind, data in self.events if kind == event_type]


@dataclass
class RecordingLedger:
    """Keeps the usage settled into it (as a job's ledger would, until its outcome commits)."""

    calls: list[CallUsage] = field(default_factory=list)

    async def record(self, usage: CallUsage) -> None:
        self.calls.append(usage)


def redis_client(url: str) -> aioredis.Redis:
    """A client built like the application's (a blocking pool, see app/core/redis.py)."""
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=100, timeout=5.0)
    return aioredis.Redis(connection_pool=pool)


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = redis_client(redis_url)
    await client.flushdb()
    yield client
    await client.flushdb()
    await client.aclose()


@pytest.fixture
def sink() -> RecordingSink:
    return RecordingSink()


def accounting_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"METERING_CACHE_SECONDS": 0}
    values.update(overrides)
    return Settings(**values)


def redis_broker_settings(redis_url: str, **overrides: Any) -> Settings:
    """Settings of an API process on a real Redis broker: metering gets the pipelined client."""
    return accounting_settings(
        BROKER="redis",
        REDIS_URL=redis_url,
        STORAGE_BACKEND="postgres",
        PROCESS_ROLE="api",
        SECRET_KEY="a-secret-key-for-these-tests-only-0123456789",
        **overrides,
    )


@pytest.fixture(params=["redis-py", "pipelined"])
async def accounting(
    request: pytest.FixtureRequest,
    storage: Storage,
    redis: aioredis.Redis,
    redis_url: str,
    sink: RecordingSink,
) -> AsyncIterator[Accounting]:
    """Metering on the shared redis-py client, and on the lean pipelined client of its own
    that API processes on a real Redis use (app/core/redis_pipe.py)."""
    if request.param == "pipelined":
        settings = redis_broker_settings(redis_url)
    else:
        settings = accounting_settings()
    built = build_accounting(settings, storage, redis, sink)
    yield built
    await built.metering.close()


# $2 per million input tokens, $10 per million output tokens.
PRICED = Model(
    id="priced",
    name="Priced",
    provider=Provider.MOCK,
    provider_model="mock",
    input_price_per_million=Decimal("2"),
    output_price_per_million=Decimal("10"),
)


@pytest.fixture
async def model(storage: Storage) -> Model:
    async with storage.unit_of_work() as uow:
        added = await uow.repo(Model).add(PRICED.model_copy())
        await uow.commit()
    return added

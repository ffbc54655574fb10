"""Builds the accounting services of one process and names their periodic jobs."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

from app.config import BrokerKind, Settings
from app.core.errors import NotFound
from app.core.events import EventSink
from app.core.invalidation import InvalidationBus
from app.core.redis_pipe import PipelinedRedis
from app.logs.service import LogService
from app.queue.periodic import PeriodicTask
from app.storage.protocol import Storage
from app.usage.admission import ConfigLookup
from app.usage.budgets import BudgetService
from app.usage.ledger import UsageWriter
from app.usage.limits import RateLimits
from app.usage.metering import Metering, MeteringOptions
from app.usage.service import UsageService

log = logging.getLogger(__name__)


@dataclass
class Accounting:
    """The metering facade and the services behind the admin API and periodic jobs."""

    metering: Metering
    usage: UsageService
    budgets: BudgetService
    logs: LogService


def build_accounting(
    settings: Settings,
    storage: Storage,
    redis: Any,
    events: EventSink,
    *,
    config: ConfigLookup | None = None,
    bus: InvalidationBus | None = None,
) -> Accounting:
    """The accounting services; calls' usage is written by this process (app/usage/ledger.py).

    Budget, limit and price changes reach the caches of metering through `bus` (the process's
    invalidation channel; without one, only this process's).
    """
    bus = bus or InvalidationBus(None, shared=False)
    budgets = BudgetService(storage, events, bus)
    usage = UsageService(storage, budgets)
    writer = UsageWriter(
        storage,
        usage,
        max_batch=settings.USAGE_WRITE_MAX_CALLS,
        in_flight=settings.USAGE_WRITES_IN_FLIGHT,
        retry_interval=settings.USAGE_RETRY_INTERVAL_SECONDS,
    )
    options = MeteringOptions(
        default_limits=RateLimits(
            requests_per_minute=settings.RATE_LIMIT_REQUESTS_PER_MINUTE,
            tokens_per_minute=settings.RATE_LIMIT_TOKENS_PER_MINUTE,
            requests_per_day=settings.RATE_LIMIT_REQUESTS_PER_DAY,
            tokens_per_day=settings.RATE_LIMIT_TOKENS_PER_DAY,
        ),
        default_max_output_tokens=settings.METERING_DEFAULT_MAX_OUTPUT_TOKENS,
        cache_seconds=settings.METERING_CACHE_SECONDS,
        log_bodies=settings.LOG_REQUEST_BODIES,
    )
    hot = hot_path_redis(settings)
    metering = Metering(
        storage,
        hot or redis,
        budgets,
        writer,
        usage,
        options,
        config=config,
        owns_redis=hot is not None,
        bus=bus,
    )
    return Accounting(metering=metering, usage=usage, budgets=budgets, logs=LogService(storage))


def hot_path_redis(settings: Settings) -> PipelinedRedis | None:
    """A client for the scripts every call runs, when the broker is a real Redis (else None:
    the shared client serves).

    It is the lean pipelined client (app/core/redis_pipe.py): a tenth of redis-py's CPU per
    admission. It has no socket timeout; metering bounds each call with `asyncio.timeout`.
    """
    if settings.BROKER is not BrokerKind.REDIS:
        return None
    return PipelinedRedis(settings.redis_endpoint(), connect_timeout=2.0)


async def _days(accounting: Accounting, key: str, default: int) -> int:
    lookup = accounting.metering.config
    if lookup is not None:
        try:
            value = await lookup(key)
        except Exception:
            log.warning("app configuration unavailable; %s defaults to %d", key, default)
            return default
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return default


def accounting_tasks(accounting: Accounting, settings: Settings) -> list[PeriodicTask]:
    """Budget resets, usage roll-ups with retention, and log retention."""

    async def purge_usage() -> None:
        days = await _days(accounting, "retention.usage_days", settings.USAGE_RETENTION_DAYS)
        await accounting.usage.purge_expired(days)

    async def purge_logs() -> None:
        days = await _days(accounting, "retention.logs_days", settings.LOG_RETENTION_DAYS)
        await accounting.logs.purge_expired(days)

    return [
        PeriodicTask(
            "budgets.reset", settings.BUDGET_RESET_INTERVAL_SECONDS, accounting.budgets.reset_due
        ),
        PeriodicTask("usage.rollup", settings.ACCOUNTING_INTERVAL_SECONDS, purge_usage),
        PeriodicTask("logs.retention", settings.ACCOUNTING_INTERVAL_SECONDS, purge_logs),
    ]


class _ConfigSource(Protocol):
    async def get(self, key: str) -> Any: ...


def app_config_reader(config: _ConfigSource) -> ConfigLookup:
    """Reads one application setting from `config` (the app configuration service); None when
    it is not a known setting."""

    async def read(key: str) -> Any:
        try:
            return await config.get(key)
        except NotFound:
            return None

    return read

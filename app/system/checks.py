"""Readiness probes of the dependencies a process needs, each bounded in time."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from app.config import BrokerKind, Settings
from app.core.errors import DomainError
from app.storage.protocol import Storage
from app.system.schemas import CheckRead, ReadyRead

logger = logging.getLogger(__name__)

# Orchestrators give up on a probe after a few seconds; answer before they do.
CHECK_TIMEOUT = 2.5


async def _probe(name: str, call: Callable[[], Awaitable[object]], seconds: float) -> CheckRead:
    started = time.perf_counter()
    try:
        await asyncio.wait_for(call(), seconds)
    except TimeoutError:
        logger.warning("readiness: %s did not answer within %g s", name, seconds)
        return CheckRead(status="unavailable", error=f"no answer within {seconds:g} s")
    except DomainError as exc:
        logger.warning("readiness: %s unavailable: %s", name, exc.message)
        return CheckRead(status="unavailable", error=exc.message)
    except Exception as exc:
        # Driver messages may carry hosts or credentials: log them, answer with the kind only.
        logger.warning("readiness: %s unavailable", name, exc_info=exc)
        return CheckRead(status="unavailable", error=f"{name} unreachable: {type(exc).__name__}")
    return CheckRead(status="ok", latency_ms=round((time.perf_counter() - started) * 1000, 2))


async def _ping(client: Redis | None, url: str, socket_timeout: float) -> None:
    if client is not None:
        await client.ping()
        return
    client = Redis.from_url(
        url,
        socket_connect_timeout=socket_timeout,
        socket_timeout=socket_timeout,
        retry=Retry(NoBackoff(), 0),
    )
    try:
        await client.ping()
    finally:
        await client.aclose()


async def check_readiness(
    settings: Settings,
    storage: Storage,
    redis_client: Redis | None = None,
    *,
    seconds: float = CHECK_TIMEOUT,
) -> ReadyRead:
    """Probe the storage and, when one is in use, Redis, concurrently, each within `seconds`."""
    checks: dict[str, CheckRead] = {}
    probes: dict[str, Awaitable[CheckRead]] = {}
    if storage.name == "memory":
        checks["database"] = CheckRead(status="ok", backend="memory")
    else:
        probes["database"] = _probe("database", storage.check, seconds)
    if redis_client is not None or settings.BROKER is BrokerKind.REDIS:
        probes["redis"] = _probe(
            "redis", lambda: _ping(redis_client, settings.REDIS_URL, seconds), seconds
        )
    elif settings.BROKER is BrokerKind.FAKEREDIS:
        checks["redis"] = CheckRead(status="ok", backend="fakeredis")
    checks.update(zip(probes, await asyncio.gather(*probes.values()), strict=True))
    checks = dict(sorted(checks.items()))  # database, then redis
    ready = all(check.status == "ok" for check in checks.values())
    return ReadyRead(status="ready" if ready else "not_ready", checks=checks)

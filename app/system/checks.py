"""Readiness probes of the dependencies a process uses, concurrent and each bounded in time."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from redis.asyncio import Redis

from app.config import BrokerKind, Settings
from app.core.errors import DomainError
from app.storage.protocol import Storage
from app.system.schemas import CheckRead, ReadyRead

logger = logging.getLogger(__name__)

# Orchestrators give up on a probe after a few seconds: the probes run at once, so /ready
# answers within this (and a little), whatever is down.
CHECK_TIMEOUT = 1.5

Probe = Callable[[], Awaitable[object]]


@dataclass(frozen=True, slots=True)
class Dependency:
    """One thing the process needs: asked by `probe`, or in-process (`backend`) and always up."""

    name: str
    probe: Probe | None = None
    backend: str | None = None


def process_dependencies(
    settings: Settings, storage: Storage, redis: Redis, *, started: Probe | None = None
) -> list[Dependency]:
    """What a process built by `build_services` on `storage` and `redis` talks to, once each.

    Its database, and with BROKER=redis the one Redis server of REDIS_URL: the broker, job
    sends, metering, caches, sessions and invalidation all connect there with the same
    `Settings.redis_endpoint()`, so a ping through `redis`, the client the process shares,
    stands for all of them. Otherwise its Redis is the in-process stand-in. `started`, when
    given, is asked with the database: the process's own writes there at start-up (the API's
    bootstrap), which a database not migrated yet refuses.
    """
    if storage.name == "memory":
        dependencies = [Dependency("database", backend="memory")]
    else:

        async def database() -> None:
            await storage.check()
            if started is not None:
                await started()

        dependencies = [Dependency("database", database)]
    if settings.BROKER is BrokerKind.REDIS:
        dependencies.append(Dependency("redis", redis.ping))
    elif settings.BROKER is BrokerKind.FAKEREDIS:
        dependencies.append(Dependency("redis", backend="fakeredis"))
    return dependencies


def _reason(name: str, exc: Exception) -> str:
    """Why `name` is unavailable, in words that cannot carry a host or a credential."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"{name} unreachable: TLS certificate verification failed"
        if isinstance(cause, ssl.SSLError):
            return f"{name} unreachable: TLS handshake failed"
        cause = cause.__cause__ or cause.__context__
    return f"{name} unreachable: {type(exc).__name__}"


async def _probe(name: str, call: Probe, seconds: float) -> CheckRead:
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
        return CheckRead(status="unavailable", error=_reason(name, exc))
    return CheckRead(status="ok", latency_ms=round((time.perf_counter() - started) * 1000, 2))


async def check_readiness(
    dependencies: Sequence[Dependency], *, seconds: float = CHECK_TIMEOUT
) -> ReadyRead:
    """Probe every dependency concurrently, each within `seconds`; ready when all answer."""
    checks: dict[str, CheckRead] = {}
    probes: dict[str, Awaitable[CheckRead]] = {}
    for dependency in dependencies:
        if dependency.probe is None:
            checks[dependency.name] = CheckRead(status="ok", backend=dependency.backend)
        else:
            probes[dependency.name] = _probe(dependency.name, dependency.probe, seconds)
    checks.update(zip(probes, await asyncio.gather(*probes.values()), strict=True))
    checks = dict(sorted(checks.items()))  # database, then redis
    ready = all(check.status == "ok" for check in checks.values())
    return ReadyRead(status="ready" if ready else "not_ready", checks=checks)

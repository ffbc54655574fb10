"""The worker's composition root: storage, queue, services and the job runner of one process."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass

import dramatiq

from app.config import BrokerKind, ProcessRole, Settings, StorageBackend
from app.core.redis import build_redis
from app.operations.presence import Presence
from app.operations.runner import OperationRunner
from app.queue.periodic import LocalTickLock, PeriodicRunner, PeriodicTask, RedisTickLock
from app.queue.port import DramatiqQueue, build_queue
from app.services import Services, build_handlers, build_services, job_timings
from app.storage.factory import build_storage
from app.storage.memory import MemoryStore
from app.storage.protocol import Storage
from app.usage.wiring import accounting_tasks

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """What actors and periodic jobs of this process use."""

    settings: Settings
    services: Services
    runner: OperationRunner
    periodic: PeriodicRunner

    async def close(self) -> None:
        await self.services.aclose()  # usage not yet written goes out first
        await self.services.redis.aclose()
        if isinstance(self.services.queue, DramatiqQueue):
            await self.services.queue.aclose()
        await self.services.storage.close()


_settings: Settings | None = None
_memory_store: MemoryStore | None = None
_storage: Storage | None = None
_runtime: Runtime | None = None


def configure(
    settings: Settings, *, memory_store: MemoryStore | None = None, storage: Storage | None = None
) -> None:
    """Set what the runtime is built from (the dev runner shares its memory store this way)."""
    global _settings, _memory_store, _storage, _runtime
    _settings, _memory_store, _storage, _runtime = settings, memory_store, storage, None


def settings() -> Settings:
    global _settings
    if _settings is None:
        _settings = Settings(PROCESS_ROLE=ProcessRole(os.environ.get("PROCESS_ROLE", "worker")))
    return _settings


def worker_id() -> str:
    """This process's name as a worker: on the jobs it claims, and on its heartbeat."""
    return f"{socket.gethostname()}-{os.getpid()}"


def get_runtime() -> Runtime:
    """This process's runtime, built on first use inside the worker's event loop."""
    global _runtime
    if _runtime is None:
        _runtime = _build(settings())
    return _runtime


def _build(config: Settings) -> Runtime:
    asyncio.get_running_loop()  # engines bind to the loop that first uses them: the worker's
    storage = _storage or build_storage(config, memory_store=_memory_store)
    queue = build_queue(config, dramatiq.get_broker())
    redis_client = build_redis(config)
    services = build_services(config, storage, queue, redis_client)
    shared = config.BROKER is BrokerKind.REDIS and config.STORAGE_BACKEND is StorageBackend.POSTGRES
    presence = None
    if shared and config.WORKER_PRESENCE_TTL_SECONDS > 0:
        presence = Presence(redis_client, ttl=config.WORKER_PRESENCE_TTL_SECONDS)
    runner = OperationRunner(
        storage,
        queue,
        build_handlers(services),
        worker_id=worker_id(),
        timings=job_timings(config),
        events=services.events,
        presence=presence,
    )
    # With memory storage or fakeredis one process holds everything: ticks are its own.
    lock = RedisTickLock(redis_client, worker_id()) if shared else LocalTickLock()
    tasks = [
        PeriodicTask("sweep", config.SWEEP_INTERVAL_SECONDS, runner.sweep),
        PeriodicTask("purge", config.PURGE_INTERVAL_SECONDS, runner.purge_finished),
        PeriodicTask(
            "purge-webhook-deliveries",
            config.PURGE_INTERVAL_SECONDS,
            services.webhooks.purge_deliveries,
        ),
        PeriodicTask("batches", config.SWEEP_INTERVAL_SECONDS, services.batches.process_due),
        PeriodicTask(
            "experiment-rollup", config.EXPERIMENT_ROLLUP_SECONDS, services.experiments.roll_up
        ),
        *accounting_tasks(services.accounting, config),
    ]
    if presence is not None:
        # Twice per heartbeat lifetime: a dead worker's jobs are pending again within about
        # one and a half of it.
        tasks.append(PeriodicTask("orphans", presence.ttl / 2, runner.recover_orphans))
    return Runtime(
        settings=config,
        services=services,
        runner=runner,
        periodic=PeriodicRunner(tasks, lock),
    )

"""Sets the process's Dramatiq broker from settings; must run before actors are imported."""

from __future__ import annotations

import asyncio
from pathlib import Path

import dramatiq
import uvloop

from app.config import Settings
from app.queue.broker import build_broker
from workers import runtime
from workers.middleware import (
    Heartbeat,
    Metrics,
    OneStopPerSignal,
    Periodic,
    Presence,
    ProcessLogging,
    ProcessTracing,
    QuickIdlePolling,
)

_broker: dramatiq.Broker | None = None


def setup_broker(settings: Settings) -> dramatiq.Broker:
    """Build the broker `BROKER` names, with periodic jobs, and make it the global one."""
    global _broker
    # The AsyncIO middleware's event loop runs every job; uvloop's costs a fraction of the
    # default loop's CPU per socket event (database and Redis replies, a few per job).
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    heartbeat = Heartbeat(Path(settings.WORKER_HEARTBEAT_DIR), settings.WORKER_HEARTBEAT_SECONDS)
    metrics = Metrics(
        settings.METRICS_HOST, settings.WORKER_METRICS_PORT, settings.WORKER_PROCESSES
    )
    _broker = build_broker(
        settings,
        middleware=[
            ProcessLogging(settings),
            ProcessTracing(settings),
            Periodic(),
            OneStopPerSignal(),
            QuickIdlePolling(),
            heartbeat,
            Presence(settings.WORKER_PRESENCE_TTL_SECONDS),
            metrics,
        ],
    )
    dramatiq.set_broker(_broker)
    return _broker


def ensure_broker() -> dramatiq.Broker:
    """The broker set up by the runner, or one built from the environment (`dramatiq` CLI)."""
    return _broker or setup_broker(runtime.settings())

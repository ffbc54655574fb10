"""Runs the periodic jobs on the worker's event loop for as long as the worker runs."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import dramatiq
from dramatiq.asyncio import get_event_loop_thread

from app.cli import configure_logging
from app.config import Settings
from app.core import heap, tracing
from app.core.metrics import MetricsListener, serve_on_free_port
from app.gateway.chat import ensure_builtin_models
from app.operations.presence import PresenceBeat
from app.system import liveness
from workers import runtime

log = logging.getLogger(__name__)


class Periodic(dramatiq.Middleware):
    """Prepares the runtime before the worker consumes, runs the periodic loop while it runs,
    and closes the runtime once the worker's jobs are done."""

    def __init__(self) -> None:
        self._stop: asyncio.Event | None = None
        self._future: Future[Any] | None = None

    def before_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        thread = get_event_loop_thread()
        if thread is None:
            raise RuntimeError("the AsyncIO middleware must come before Periodic")

        async def prepare() -> None:
            services = runtime.get_runtime().services
            # Follow the admin API's changes (keys, budgets, limits, prices) as API processes do.
            await services.start()
            await ensure_builtin_models(services.storage)

        # Before consuming: a job for `mock` taken at boot must find the model, not fail for good.
        try:
            asyncio.run_coroutine_threadsafe(prepare(), thread.loop).result(timeout=30)
        except Exception:
            log.exception("could not ensure the built-in models; continuing")

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        thread = get_event_loop_thread()
        if thread is None:
            raise RuntimeError("the AsyncIO middleware must come before Periodic")

        async def run() -> None:
            self._stop = asyncio.Event()
            await runtime.get_runtime().periodic.run_forever(self._stop)

        self._future = asyncio.run_coroutine_threadsafe(run(), thread.loop)
        if runtime.settings().GC_SETTLE:
            heap.settle()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        thread = get_event_loop_thread()
        if thread is None or self._stop is None:
            return
        thread.loop.call_soon_threadsafe(self._stop.set)
        if self._future is not None:
            try:
                self._future.result(timeout=5)
            except Exception:
                log.exception("the periodic loop did not stop cleanly")

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        # The jobs have finished (or were given up), so nothing uses the runtime any more; the
        # AsyncIO middleware stops the event loop after this (after-hooks run in reverse order).
        thread = get_event_loop_thread()
        if thread is None or self._stop is None:
            return

        async def close() -> None:
            await runtime.get_runtime().close()

        try:
            asyncio.run_coroutine_threadsafe(close(), thread.loop).result(timeout=5)
        except Exception:
            log.exception("closing the worker runtime failed")


class ProcessLogging(dramatiq.Middleware):
    """Configures logging in each `gateway worker` process as the API's is (`LOG_FORMAT`, the
    context ids), in place of Dramatiq's own format (the runner passes `--skip-logging`).

    Dramatiq points a worker process's stderr at the pipe its main process reads before it
    loads the broker, so the handler configured here writes whole lines through that pipe.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        configure_logging(self.settings)


class ProcessTracing(dramatiq.Middleware):
    """Each `gateway worker` process exports its spans itself when OTEL_EXPORTER_OTLP_ENDPOINT
    is set (`app.core.tracing`), from a thread started after the fork, and flushes them when
    its jobs are done. (`gateway dev` shares the API's.)"""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        tracing.configure(
            self.settings.OTEL_EXPORTER_OTLP_ENDPOINT, self.settings.otel_service_name()
        )

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        tracing.flush()


class OneStopPerSignal(dramatiq.Middleware):
    """Treats the two SIGTERMs a worker process gets when its whole group is signalled as one.

    `kill -TERM -<pgid>`, Procfile runners and some supervisors signal every process of the
    group, and Dramatiq's main process forwards the signal to its children as well. Dramatiq
    takes a second SIGTERM as "kill now" and calls `sys.exit` from the signal handler, which
    leaves the worker's threads running: the process never exits. Here a repeat within a second
    is the same request to stop, and a later one exits at once for real.
    """

    REPEAT_WINDOW = 1.0

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        graceful = signal.getsignal(signal.SIGTERM)
        if not callable(graceful):
            return
        first: float | None = None

        def on_term(signum: int, frame: Any) -> None:
            nonlocal first
            now = time.monotonic()
            if first is None:
                first = now
                graceful(signum, frame)
            elif now - first > self.REPEAT_WINDOW:
                log.warning("second stop request: exiting without waiting for running jobs")
                os._exit(1)  # their leases run out and the sweeper hands the jobs to others

        signal.signal(signal.SIGTERM, on_term)


class QuickIdlePolling(dramatiq.Middleware):
    """Caps how long an idle `gateway worker` consumer waits before polling its queue again.

    Dramatiq's consumers back off up to `worker_timeout` (1 s by default) while their queue is
    empty, so the first job after a quiet spell waited up to a second. On Redis a poll is one
    cheap script call; `gateway dev` keeps its own, longer ceiling (its Redis runs in Python).
    """

    IDLE_POLL_MS = 200

    def __init__(self) -> None:
        self._worker_process = False

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        self._worker_process = True  # only `gateway worker` processes boot through the CLI

    def before_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        if self._worker_process:
            worker.worker_timeout = self.IDLE_POLL_MS


class Heartbeat(dramatiq.Middleware):
    """Touches this `gateway worker` process's liveness file from its event loop while it runs,
    so that `gateway healthcheck` sees a stuck or dead process (a worker serves no HTTP)."""

    def __init__(self, directory: Path, interval: float) -> None:
        self.directory = directory
        self.interval = interval
        self._worker_process = False
        self._future: Future[Any] | None = None

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        self._worker_process = True  # only `gateway worker` processes boot through the CLI

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        thread = get_event_loop_thread()
        if not self._worker_process or thread is None:
            return

        async def run() -> None:
            while True:
                try:
                    liveness.beat(self.directory)
                except OSError:
                    log.exception("cannot write the liveness file in %s", self.directory)
                await asyncio.sleep(self.interval)

        self._future = asyncio.run_coroutine_threadsafe(run(), thread.loop)

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        if self._future is not None:
            self._future.cancel()
            self._future = None
            liveness.forget(self.directory)


class Presence(dramatiq.Middleware):
    """Stamps this `gateway worker` process's heartbeat in Redis from before it consumes until
    its last job is done (`app/operations/presence.py`), so that when it dies the sweeper
    hands its running jobs to others within about `ttl`, not a whole lease later."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._worker_process = False
        self._beat: PresenceBeat | None = None

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        self._worker_process = True  # only `gateway worker` processes boot through the CLI

    def before_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        client = getattr(broker, "client", None)  # the Redis broker's own blocking client
        if not self._worker_process or client is None or self.ttl <= 0:
            return
        self._beat = PresenceBeat(client, runtime.worker_id(), ttl=self.ttl)
        self._beat.start()

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        if self._beat is not None:
            self._beat.stop()
            self._beat = None


class Metrics(dramatiq.Middleware):
    """Each worker process serves its own metrics on the first free port from `base` on.

    One port per process, not the library's multiprocess mode: a process owns its registry,
    nothing is shared on disk, and a dead process's series vanish with its scrape target.
    Prometheus scrapes `base .. base + span - 1` (`span`: WORKER_PROCESSES).
    """

    def __init__(self, host: str, base: int | None, span: int) -> None:
        self._host, self._base, self._span = host, base, span
        self._listener: MetricsListener | None = None

    def before_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        if self._base is not None and self._listener is None:
            self._listener = serve_on_free_port(self._host, self._base, self._span)

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None

"""The worker middleware that adjusts Dramatiq's defaults for `gateway worker` processes."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from dramatiq.brokers.stub import StubBroker

from workers.middleware import QuickIdlePolling


def test_a_worker_process_polls_an_idle_queue_at_least_five_times_a_second() -> None:
    middleware, worker = QuickIdlePolling(), SimpleNamespace(worker_timeout=1000)
    broker = StubBroker()

    middleware.after_process_boot(broker)  # what the Dramatiq CLI emits in a worker process
    middleware.before_worker_boot(broker, worker)  # type: ignore[arg-type]

    assert worker.worker_timeout <= 200


def test_an_in_process_worker_keeps_the_polling_it_was_given() -> None:
    middleware, worker = QuickIdlePolling(), SimpleNamespace(worker_timeout=500)
    broker: Any = StubBroker()

    middleware.before_worker_boot(broker, worker)  # type: ignore[arg-type]

    assert worker.worker_timeout == 500

"""The worker middleware that adjusts Dramatiq's defaults for `gateway worker` processes."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from dramatiq.brokers.stub import StubBroker

from app.config import ProcessRole, Settings
from app.core import tracing
from workers.middleware import ProcessTracing, QuickIdlePolling


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


def test_a_worker_process_exports_its_spans_as_the_worker_service_when_an_endpoint_is_set() -> None:
    broker = StubBroker()
    ProcessTracing(Settings()).after_process_boot(broker)
    assert not tracing.enabled()  # no endpoint: no spans, no SDK

    worker = Settings(
        PROCESS_ROLE=ProcessRole.DEV, OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9"
    )
    worker = worker.model_copy(update={"PROCESS_ROLE": ProcessRole.WORKER})
    try:
        ProcessTracing(worker).after_process_boot(broker)
        assert tracing.enabled()
        assert tracing._provider is not None
        assert tracing._provider.resource.attributes["service.name"] == "llm-gateway-worker"
    finally:
        provider = tracing._provider
        tracing.install(None)
        if provider is not None:
            provider.shutdown()

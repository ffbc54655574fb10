"""Traces: the spans of a call nest, a job's run is a child of the request that created it, a
webhook delivery has its span, and with tracing off nothing is recorded or imported."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from app.config import ProcessRole, Settings
from app.core import tracing
from app.main import create_app
from app.models.entities import Model
from app.operations.entities import Operation
from app.operations.runner import JobTimings, OperationRunner
from app.services import Services, build_handlers
from app.storage.memory import MemoryStorage
from app.storage.protocol import Storage
from tests.fakes import RecordingQueue
from tests.usage.test_chat_metering import CALL, PRICED
from tests.webhooks.receiver import Received, Receiver, Reply
from tests.webhooks.test_delivery import make_rig

ADMIN_KEY = "gw-tracing-tests-admin-secret-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
CHAT = "/v1/chat/completions"
FAST = JobTimings(lease=5, heartbeat=1, retry_base=0.01, retry_max=0.02, resend_after=0.2)
PROMPT = "a prompt no span may quote 7f3a"
ASKED = {**CALL, "messages": [{"role": "user", "content": PROMPT}]}


@pytest.fixture(autouse=True)
def _no_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Every span of the test, exported as it ends."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    yield exporter
    tracing.install(None)
    provider.shutdown()


@pytest.fixture
async def gateway(storage: Storage) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    async with storage.unit_of_work() as uow:
        await uow.repo(Model).add(PRICED.model_copy())
        await uow.commit()
    settings = Settings(
        BROKER="stub", ADMIN_API_KEY=ADMIN_KEY, CACHE_BACKEND="memory", METERING_CACHE_SECONDS=0
    )
    app = create_app(settings, storage=storage, queue=RecordingQueue(storage))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield app, client


async def new_key(client: httpx.AsyncClient) -> tuple[str, dict[str, str]]:
    response = await client.post("/admin/keys", json={"name": "client"}, headers=ADMIN)
    assert response.status_code == 201, response.text
    secret = response.json()["key"]
    return secret, {"Authorization": f"Bearer {secret}"}


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def one(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    found = named(exporter, name)
    assert len(found) == 1, [s.name for s in exporter.get_finished_spans()]
    return found[0]


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def assert_child(child: ReadableSpan, parent: ReadableSpan) -> None:
    assert child.context is not None and parent.context is not None
    assert child.context.trace_id == parent.context.trace_id
    assert parent_of(child) == parent.context.span_id


def attribute_text(exporter: InMemorySpanExporter) -> str:
    """Every span name and attribute value, as one string to search for what must not be."""
    parts: list[str] = []
    for span in exporter.get_finished_spans():
        parts.append(span.name)
        parts.extend(f"{k}={v}" for k, v in (span.attributes or {}).items())
        parts.extend(str(event.attributes) for event in span.events)
    return "\n".join(parts)


@pytest.mark.parametrize("query", ["", "?async=false"], ids=["fast-path", "stack"])
async def test_a_direct_call_nests_admission_cache_and_upstream_under_its_request(
    spans: InMemorySpanExporter, gateway: tuple[FastAPI, httpx.AsyncClient], query: str
) -> None:
    _, client = gateway
    secret, key = await new_key(client)
    spans.clear()
    response = await client.post(f"{CHAT}{query}", json=ASKED, headers=key)
    assert response.status_code == 200, response.text

    request = one(spans, f"POST {CHAT}")
    assert request.kind is SpanKind.SERVER and request.parent is None
    assert request.attributes is not None
    assert request.attributes["http.route"] == CHAT
    assert request.attributes["http.response.status_code"] == 200
    for step in ("gateway.admission", "gateway.cache", "gateway.upstream"):
        assert_child(one(spans, step), request)
    assert one(spans, "gateway.admission").attributes == {"gateway.model": "priced-mock"}
    assert one(spans, "gateway.cache").attributes == {"gateway.cache.result": "miss"}
    upstream = one(spans, "gateway.upstream")
    assert upstream.kind is SpanKind.CLIENT
    assert upstream.status.status_code is StatusCode.UNSET
    assert upstream.attributes == {
        "gateway.route": "priced-mock",
        "gateway.provider": "mock",
        "gateway.model": "priced-mock",
        "gateway.outcome": "ok",
        "gateway.route.steps": 1,
    }
    recorded = attribute_text(spans)
    assert PROMPT not in recorded and secret not in recorded


async def test_a_request_continues_the_trace_its_caller_sent(
    spans: InMemorySpanExporter, gateway: tuple[FastAPI, httpx.AsyncClient]
) -> None:
    _, client = gateway
    _, key = await new_key(client)
    spans.clear()
    trace_id, span_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    caller = {**key, "traceparent": f"00-{trace_id}-{span_id}-01"}
    assert (await client.post(CHAT, json=CALL, headers=caller)).status_code == 200
    request = one(spans, f"POST {CHAT}")
    assert request.context is not None
    assert f"{request.context.trace_id:032x}" == trace_id
    assert parent_of(request) == int(span_id, 16)


async def test_a_refused_call_ends_its_admission_span_as_an_error(
    spans: InMemorySpanExporter, gateway: tuple[FastAPI, httpx.AsyncClient]
) -> None:
    _, client = gateway
    _, key = await new_key(client)
    budget = {"name": "none left", "period": "daily", "hard_limit_micros": 1}
    assert (await client.post("/admin/budgets", json=budget, headers=ADMIN)).status_code == 201
    spans.clear()
    assert (await client.post(CHAT, json=CALL, headers=key)).status_code == 402
    admission = one(spans, "gateway.admission")
    assert admission.status.status_code is StatusCode.ERROR
    assert admission.attributes is not None
    assert admission.attributes["error.type"] == "budget_exceeded"
    assert not named(spans, "gateway.upstream")
    # A refusal is the client's affair: the request itself is not an error.
    assert one(spans, f"POST {CHAT}").status.status_code is StatusCode.UNSET


async def test_an_async_call_links_the_workers_run_to_the_request_that_created_the_job(
    spans: InMemorySpanExporter, gateway: tuple[FastAPI, httpx.AsyncClient]
) -> None:
    app, client = gateway
    services: Services = app.state.services
    _, key = await new_key(client)
    spans.clear()
    accepted = await client.post(f"{CHAT}?async=true", json=ASKED, headers=key)
    assert accepted.status_code == 202, accepted.text
    operation_id = accepted.json()["operation_id"]

    request = one(spans, f"POST {CHAT}")
    enqueue = one(spans, "job.enqueue")
    assert enqueue.kind is SpanKind.PRODUCER
    assert_child(enqueue, request)
    assert enqueue.attributes == {
        "gateway.operation.kind": "chat_completion",
        "gateway.operation.id": operation_id,
    }
    # The context travels in the job's row, whichever backend keeps it.
    async with services.storage.unit_of_work() as uow:
        row = await uow.repo(Operation).get(operation_id)
    assert row is not None and set(row.trace_context) == {"traceparent"}

    # The worker runs it later, from no request at all.
    queue = services.queue
    assert isinstance(queue, RecordingQueue)
    runner = OperationRunner(
        services.storage, queue, build_handlers(services), timings=FAST, events=services.events
    )
    assert await runner.execute(queue.sent.pop(0).operation_id)

    run = one(spans, "job.run")
    assert run.kind is SpanKind.CONSUMER
    assert_child(run, enqueue)
    assert run.start_time is not None and request.end_time is not None
    assert run.start_time > request.end_time
    assert run.attributes is not None
    assert run.attributes["gateway.operation.id"] == operation_id
    assert run.attributes["gateway.job.outcome"] == "succeeded"
    assert run.attributes["gateway.operation.attempt"] == 1
    # The call the job made nests under its run, as a direct call nests under its request.
    for step in ("gateway.admission", "gateway.upstream"):
        assert_child(one(spans, step), run)
    assert PROMPT not in attribute_text(spans)


async def test_a_webhook_delivery_has_a_span_under_the_run_of_its_job(
    spans: InMemorySpanExporter,
) -> None:
    replies: list[Reply] = [(500, b"down"), (204, b"")]

    async def respond(request: Received) -> Reply:
        return replies.pop(0)

    receiver = await Receiver(respond).start()
    rig = make_rig(MemoryStorage())
    try:
        webhook, _ = await rig.webhooks.create(url=f"{receiver.url}?token=url-secret-93c1")
        await rig.emit("api_key.created", {})
        await rig.drain()
    finally:
        await rig.client.aclose()
        await receiver.close()

    failed, succeeded = sorted(named(spans, "webhook.delivery"), key=lambda s: s.start_time or 0)
    runs = sorted(named(spans, "job.run"), key=lambda s: s.start_time or 0)
    enqueue = one(spans, "job.enqueue")
    for delivery, run in zip((failed, succeeded), runs, strict=True):
        assert delivery.kind is SpanKind.CLIENT
        assert_child(delivery, run)
        # Both attempts are children of the span that staged the delivery.
        assert_child(run, enqueue)
        assert delivery.attributes is not None
        assert delivery.attributes["gateway.webhook.id"] == webhook.id
        assert delivery.attributes["gateway.webhook.event_type"] == "api_key.created"
    assert failed.attributes is not None and succeeded.attributes is not None
    assert failed.attributes["http.response.status_code"] == 500
    assert failed.attributes["gateway.webhook.outcome"] == "retry"
    assert failed.status.status_code is StatusCode.ERROR
    assert succeeded.attributes["http.response.status_code"] == 204
    assert succeeded.attributes["gateway.webhook.outcome"] == "succeeded"
    assert succeeded.attributes["gateway.webhook.attempt"] == 2
    assert "url-secret-93c1" not in attribute_text(spans)


async def test_with_tracing_off_nothing_is_recorded(
    gateway: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    tracing.install(None)  # on, then off again
    app, client = gateway
    _, key = await new_key(client)
    assert (await client.post(CHAT, json=CALL, headers=key)).status_code == 200
    accepted = await client.post(f"{CHAT}?async=true", json=CALL, headers=key)
    assert accepted.status_code == 202
    assert tracing.span("anything") is tracing.NO_SPAN
    assert exporter.get_finished_spans() == ()
    async with app.state.services.storage.unit_of_work() as uow:
        row = await uow.repo(Operation).get(accepted.json()["operation_id"])
    assert row is not None and row.trace_context == {}
    provider.shutdown()


def test_with_tracing_off_no_tracing_sdk_or_exporter_is_imported(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        from fastapi.testclient import TestClient
        from app.config import Settings
        from app.core import tracing
        from app.main import create_app

        settings = Settings(BROKER="stub", ADMIN_API_KEY={ADMIN_KEY!r})
        with TestClient(create_app(settings)) as client:
            headers = {{"Authorization": "Bearer {ADMIN_KEY}"}}
            body = {{"model": "mock", "messages": [{{"role": "user", "content": "hi"}}]}}
            assert client.post("{CHAT}", json=body, headers=headers).status_code == 200
            queued = client.post("{CHAT}?async=true", json=body, headers=headers)
            assert queued.status_code == 202, queued.text
            assert client.get("/v1/models", headers=headers).status_code == 200
        assert not tracing.enabled()
        # (redis-py imports the SDK's metrics on its own when the SDK is installed.)
        tracing_modules = ("opentelemetry.sdk.trace", "opentelemetry.exporter")
        loaded = sorted(m for m in sys.modules if m.startswith(tracing_modules))
        print("loaded:", loaded)
        assert not loaded
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).parent.parent)},
    )
    assert done.returncode == 0, done.stdout + done.stderr


async def test_an_endpoint_makes_the_process_export_its_spans_over_otlp_http() -> None:
    received: list[Received] = []

    async def collect(request: Received) -> Reply:
        received.append(request)
        return 200, b""

    collector = await Receiver(collect).start()
    settings = Settings(
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{collector.port}",
        PROCESS_ROLE=ProcessRole.DEV,
    )
    try:
        assert tracing.configure(settings.OTEL_EXPORTER_OTLP_ENDPOINT, "gateway-under-test")
        assert not tracing.configure(settings.OTEL_EXPORTER_OTLP_ENDPOINT, "a second one")
        with tracing.span("job.enqueue"):
            pass
        # The exporter posts from its own thread, to a receiver on this loop.
        await asyncio.to_thread(tracing.flush)
    finally:
        provider = tracing._provider
        tracing.install(None)
        if provider is not None:
            await asyncio.to_thread(provider.shutdown)
        await collector.close()
    (export,) = received
    assert (export.method, export.path) == ("POST", "/v1/traces")
    assert export.headers["content-type"] == "application/x-protobuf"
    assert b"gateway-under-test" in export.body and b"job.enqueue" in export.body


def test_an_endpoint_without_the_sdk_installed_is_refused_with_what_to_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
    with pytest.raises(RuntimeError, match=r"llm-gateway\[otel\]"):
        tracing.configure("http://127.0.0.1:4318", "llm-gateway-api")
    assert not tracing.enabled()


def test_the_otlp_settings() -> None:
    assert Settings().OTEL_EXPORTER_OTLP_ENDPOINT is None
    assert Settings(OTEL_EXPORTER_OTLP_ENDPOINT="").OTEL_EXPORTER_OTLP_ENDPOINT is None
    assert Settings().otel_service_name() == "llm-gateway-api"
    postgres: dict[str, Any] = {"STORAGE_BACKEND": "postgres", "SECRET_KEY": "k" * 40}
    worker = Settings(PROCESS_ROLE=ProcessRole.WORKER, BROKER="redis", **postgres)
    assert worker.otel_service_name() == "llm-gateway-worker"
    assert Settings(OTEL_SERVICE_NAME="edge").otel_service_name() == "edge"
    with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_ENDPOINT must be"):
        Settings(OTEL_EXPORTER_OTLP_ENDPOINT="collector:4318")
    assert tracing.traces_url("http://c:4318/") == "http://c:4318/v1/traces"
    assert tracing.traces_url("http://c:4318/v1/traces") == "http://c:4318/v1/traces"

"""`/metrics`: after a known set of requests and jobs, the counters and histograms say so.

Every process has one registry, shared by the apps tests build, so each test compares a scrape
before with a scrape after (deltas), parsed with the library's own parser.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from app.config import Settings
from app.core.clock import utcnow
from app.core.metrics import exposition
from app.main import create_app
from app.models.entities import Model
from app.operations.entities import Operation, OperationStatus
from app.operations.metrics import QueueGauges
from app.operations.runner import JobTimings, OperationRunner
from app.queue.names import OperationKind
from app.services import Services, build_handlers
from app.storage.memory import MemoryStorage
from app.storage.protocol import Storage
from tests.fakes import RecordingQueue
from tests.redis_servers import free_port
from tests.usage.test_chat_metering import CALL, PRICED
from tests.webhooks.receiver import Receiver, Reply
from tests.webhooks.test_delivery import make_rig

ADMIN_KEY = "gw-metrics-tests-admin-secret-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
CHAT = "/v1/chat/completions"
POLL = "/v1/operations/{operation_id}"
FAST = JobTimings(lease=5, heartbeat=1, retry_base=0.01, retry_max=0.02, resend_after=0.2)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(autouse=True)
def _no_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    return after.get(key, 0.0) - before.get(key, 0.0)


def app_on(storage: Storage, queue: RecordingQueue, **overrides: Any) -> FastAPI:
    values: dict[str, Any] = {
        "BROKER": "stub",
        "ADMIN_API_KEY": ADMIN_KEY,
        "CACHE_BACKEND": "memory",
        "METERING_CACHE_SECONDS": 0,
        **overrides,
    }
    return create_app(Settings(**values), storage=storage, queue=queue)


async def scrape(client: httpx.AsyncClient) -> Samples:
    response = await client.get("/metrics", headers=ADMIN)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient, RecordingQueue]]:
    storage = MemoryStorage()
    async with storage.unit_of_work() as uow:
        await uow.repo(Model).add(PRICED.model_copy())
        await uow.commit()
    queue = RecordingQueue(storage)
    app = app_on(storage, queue)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield app, client, queue


async def new_key(client: httpx.AsyncClient, **body: Any) -> dict[str, str]:
    response = await client.post("/admin/keys", json={"name": "client", **body}, headers=ADMIN)
    assert response.status_code == 201, response.text
    return {"Authorization": f"Bearer {response.json()['key']}"}


async def test_requests_calls_refusals_cache_and_jobs_are_counted(
    gateway: tuple[FastAPI, httpx.AsyncClient, RecordingQueue],
) -> None:
    app, client, queue = gateway
    services: Services = app.state.services
    limited = await new_key(client, rate_limits={"requests_per_minute": 2})
    other = await new_key(client)
    before = await scrape(client)

    # Direct calls on the fast path: an upstream call, the same call from the cache, a 429.
    assert (await client.post(CHAT, json=CALL, headers=limited)).status_code == 200
    cached = await client.post(CHAT, json=CALL, headers=limited)
    assert cached.status_code == 200 and cached.headers["x-gateway-cache"] == "hit"
    assert (await client.post(CHAT, json=CALL, headers=limited)).status_code == 429
    # A job, run as a worker would, then polled (the fast path's other route).
    accepted = await client.post(f"{CHAT}?async=true", json=CALL, headers=other)
    assert accepted.status_code == 202
    runner = OperationRunner(
        services.storage, queue, build_handlers(services), timings=FAST, events=services.events
    )
    assert await runner.execute(queue.sent.pop(0).operation_id)
    polled = await client.get(f"/v1/operations/{accepted.json()['operation_id']}", headers=other)
    assert polled.status_code == 200 and polled.json()["status"] == "completed"
    # A budget no call fits: a 402, counted by the stack's route this time (a query string).
    budget = {"name": "none left", "period": "daily", "hard_limit_micros": 1}
    assert (await client.post("/admin/budgets", json=budget, headers=ADMIN)).status_code == 201
    refused = await client.post(f"{CHAT}?async=false", json=CALL, headers=other)
    assert refused.status_code == 402, refused.text
    assert (await client.get("/v1/models/no-such-model", headers=other)).status_code == 404

    after = await scrape(client)

    def changed(name: str, **labels: str) -> float:
        return delta(before, after, name, **labels)

    requests = "gateway_http_requests_total"
    assert changed(requests, route=CHAT, method="POST", status="200") == 2
    assert changed(requests, route=CHAT, method="POST", status="429") == 1
    assert changed(requests, route=CHAT, method="POST", status="202") == 1
    assert changed(requests, route=CHAT, method="POST", status="402") == 1
    assert changed(requests, route=POLL, method="GET", status="200") == 1
    assert changed(requests, route="/v1/models/{model_id}", method="GET", status="404") == 1
    assert changed("gateway_http_request_duration_seconds_count", route=CHAT, method="POST") == 5
    assert changed("gateway_http_request_duration_seconds_count", route=POLL, method="GET") == 1

    upstream = {"provider": "mock", "model": "priced-mock"}
    # Two upstream calls: the first direct call and the job (the cached answer made none).
    assert changed("gateway_upstream_requests_total", **upstream, outcome="ok") == 2
    assert changed("gateway_upstream_request_duration_seconds_count", **upstream) == 2
    assert changed("gateway_tokens_total", model="priced-mock", direction="output") == 20
    assert changed("gateway_cost_usd_total", model="priced-mock") == pytest.approx(0.0002)
    assert changed("gateway_cache_lookups_total", kind="exact", result="hit") == 1
    assert changed("gateway_cache_lookups_total", kind="exact", result="miss") == 2
    assert changed("gateway_admission_refusals_total", reason="rate_limit") == 1
    assert changed("gateway_admission_refusals_total", reason="budget") == 1

    job = {"kind": "chat_completion"}
    assert changed("gateway_job_attempts_total", **job, outcome="completed") == 1
    assert changed("gateway_jobs_finished_total", **job, status="completed") == 1
    assert changed("gateway_job_run_duration_seconds_count", **job) == 1
    # The queue gauges are refreshed by the scrape: the job ran, nothing waits.
    assert after[("gateway_queue_depth", frozenset({("queue", "chat")}))] == 0


async def test_a_stream_records_its_time_to_first_token(
    gateway: tuple[FastAPI, httpx.AsyncClient, RecordingQueue],
) -> None:
    _, client, _ = gateway
    key = await new_key(client)
    before = await scrape(client)
    body = {**CALL, "stream": True}
    async with client.stream("POST", CHAT, json=body, headers=key) as response:
        assert response.status_code == 200
        assert [chunk async for chunk in response.aiter_text()]
    after = await scrape(client)
    upstream = {"provider": "mock", "model": "priced-mock"}
    assert delta(before, after, "gateway_upstream_time_to_first_token_seconds_count", **upstream)
    assert delta(before, after, "gateway_upstream_requests_total", **upstream, outcome="ok") == 1
    assert delta(before, after, "gateway_tokens_total", model="priced-mock", direction="output")


async def test_metrics_need_an_admin_key(
    gateway: tuple[FastAPI, httpx.AsyncClient, RecordingQueue],
) -> None:
    _, client, _ = gateway
    assert (await client.get("/metrics")).status_code == 401
    key = await new_key(client)
    assert (await client.get("/metrics", headers=key)).status_code == 403


async def test_metrics_port_serves_them_without_credentials_on_loopback() -> None:
    port = free_port()
    storage = MemoryStorage()
    app = app_on(storage, RecordingQueue(storage), METRICS_PORT=port)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{port}/metrics")
        assert response.status_code == 200
        names = {family.name for family in text_string_to_metric_families(response.text)}
        assert {"gateway_http_requests", "gateway_queue_depth"} <= names
    # Closed with the app: the port is free again.
    async with httpx.AsyncClient() as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"http://127.0.0.1:{port}/metrics")


async def test_queue_gauges_count_sent_pending_jobs_per_queue_age_the_oldest_and_count_held_ones(
    storage: Storage,
) -> None:
    now = utcnow()

    def job(n: int, kind: OperationKind, queue: str, age: float, **more: Any) -> Operation:
        created = now - timedelta(seconds=age)
        return Operation(
            id=f"op-{n}",
            kind=kind,
            queue=queue,
            created_at=created,
            updated_at=created,
            **{"send_count": 1, **more},
        )

    chat, hooks = OperationKind.CHAT_COMPLETION, OperationKind.WEBHOOK_DELIVERY
    async with storage.unit_of_work() as uow:
        for item in (
            job(1, chat, "chat", 30),
            job(2, chat, "chat", 5),
            job(3, hooks, "webhooks", 120),
            job(4, chat, "chat", 600, status=OperationStatus.RUNNING),  # not waiting
            job(5, chat, "chat", 900, status=OperationStatus.COMPLETED),
            # Children held back by their parent's window wait for it, not for a worker.
            job(7, chat, "chat", 3000, send_count=0, enqueued_at=None),
            job(8, chat, "chat", 3000, send_count=0, enqueued_at=None),
        ):
            await uow.repo(Operation).add(item)
        await uow.commit()
    gauges = QueueGauges(storage, max_age=60)
    await gauges.refresh_if_stale()
    scraped = parse(_exposition())

    def gauge(name: str, queue: str) -> float:
        return scraped[(name, frozenset({("queue", queue)}))]

    assert gauge("gateway_queue_depth", "chat") == 2
    assert gauge("gateway_queue_depth", "webhooks") == 1
    assert gauge("gateway_queue_depth", "embeddings") == 0  # known, empty: 0, not absent
    assert 30 <= gauge("gateway_queue_oldest_job_age_seconds", "chat") < 40
    assert 120 <= gauge("gateway_queue_oldest_job_age_seconds", "webhooks") < 130
    assert gauge("gateway_queue_oldest_job_age_seconds", "embeddings") == 0
    assert gauge("gateway_queue_held_jobs", "chat") == 2
    assert gauge("gateway_queue_held_jobs", "webhooks") == 0

    # Within `max_age` a scrape reuses the last figures: no query per scrape.
    async with storage.unit_of_work() as uow:
        await uow.repo(Operation).add(job(6, chat, "chat", 1))
        await uow.commit()
    await gauges.refresh_if_stale()
    assert parse(_exposition())[("gateway_queue_depth", frozenset({("queue", "chat")}))] == 2
    await gauges.refresh()
    assert parse(_exposition())[("gateway_queue_depth", frozenset({("queue", "chat")}))] == 3


async def test_the_sweeper_counts_the_leases_it_recovers() -> None:
    storage = MemoryStorage()
    queue = RecordingQueue(storage)
    expired = utcnow() - timedelta(seconds=5)
    async with storage.unit_of_work() as uow:
        for n, attempts in ((1, 1), (2, 3)):  # the second is out of attempts
            await uow.repo(Operation).add(
                Operation(
                    id=f"op-{n}",
                    kind=OperationKind.CHAT_COMPLETION,
                    queue="chat",
                    status=OperationStatus.RUNNING,
                    attempts=attempts,
                    max_attempts=3,
                    lease_token="gone",
                    lease_expires_at=expired,
                )
            )
        await uow.commit()
    before = parse(_exposition())
    report = await OperationRunner(storage, queue, {}, timings=FAST).sweep()
    assert (report.recovered, report.exhausted) == (1, 1)
    after = parse(_exposition())
    recoveries = "gateway_job_lease_recoveries_total"
    assert delta(before, after, recoveries, outcome="recovered") == 1
    assert delta(before, after, recoveries, outcome="exhausted") == 1
    finished = "gateway_jobs_finished_total"
    assert delta(before, after, finished, kind="chat_completion", status="failed") == 1


def _exposition() -> str:
    return exposition()[0].decode()


async def test_webhook_deliveries_are_counted_by_outcome() -> None:
    storage = MemoryStorage()
    rig = make_rig(storage, schedule=(0, 0.05))
    up = await Receiver().start()
    down = await Receiver(lambda _: _reply(503)).start()
    before = parse(_exposition())
    try:
        await rig.webhooks.create(url=up.url)
        await rig.webhooks.create(url=down.url)
        await rig.emit("api_key.created", {})  # one delivery to each
        await rig.drain()
    finally:
        await rig.client.aclose()
        await up.close()
        await down.close()
    after = parse(_exposition())
    deliveries = "gateway_webhook_deliveries_total"
    assert delta(before, after, deliveries, outcome="succeeded") == 1
    # The failing endpoint: a retry, then the schedule's last attempt, abandoned.
    assert delta(before, after, deliveries, outcome="retry") == 1
    assert delta(before, after, deliveries, outcome="abandoned") == 1
    assert delta(before, after, deliveries, outcome="skipped") == 0


async def _reply(status: int) -> Reply:
    return status, b""


_WORKER_PROCESS = """
import sys
from app.core.metrics import JOBS_FINISHED
from workers.middleware import Metrics

metrics = Metrics("127.0.0.1", int(sys.argv[1]), int(sys.argv[2]))
metrics.before_worker_boot(None, None)  # what Dramatiq calls in each worker process
JOBS_FINISHED("chat_completion", "completed").inc(int(sys.argv[3]))
print(metrics._listener.port if metrics._listener else "none", flush=True)
sys.stdin.read()  # until the test is done with it
metrics.after_worker_shutdown(None, None)
"""


@pytest.mark.slow
def test_worker_processes_on_one_host_each_serve_their_own_metrics() -> None:
    base, span = free_port(), 4
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER_PROCESS, str(base), str(span), str(jobs)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for jobs in (1, 5)
    ]
    try:
        ports = [int(p.stdout.readline()) for p in processes if p.stdout is not None]
        assert len(set(ports)) == 2 and all(base <= port < base + span for port in ports)
        scraped = [parse(httpx.get(f"http://127.0.0.1:{port}/metrics").text) for port in ports]
    finally:
        for process in processes:
            process.communicate(timeout=60)  # a loaded host is slow to stop them
    finished = (
        "gateway_jobs_finished_total",
        frozenset({("kind", "chat_completion"), ("status", "completed")}),
    )
    # Each process's own count, on its own port: neither overwrote nor summed the other's.
    assert [figures[finished] for figures in scraped] == [1, 5]

"""No event lost: real worker processes on Redis and PostgreSQL, one killed mid-delivery."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import orjson
import psycopg
import pytest

from app.config import Settings
from app.core.crypto import SecretBox
from app.core.outbound import OutboundClient, OutboundPolicy
from app.operations.service import OperationService
from app.operations.submit import Owner
from app.queue.broker import build_broker
from app.queue.names import OperationKind
from app.queue.port import build_queue
from app.storage.sql import SqlStorage, make_database
from app.webhooks.service import WebhookConfig, WebhookService
from tests.processes import Processes, env_for, wait_until
from tests.webhooks.receiver import Received, Reply, ThreadedReceiver, verify

pytestmark = pytest.mark.slow

EVENTS = 150
JOBS = 5


def worker_env(database_url: str, redis_url: str) -> dict[str, str]:
    return env_for(
        database_url,
        redis_url,
        OUTBOUND_ALLOWED_HOSTS="127.0.0.1",
        WEBHOOK_RETRY_SCHEDULE="0,0.5,1,1,1,1,1,1",
        WEBHOOK_TIMEOUT_SECONDS="5",
    )


@dataclass
class Emitter:
    storage: SqlStorage
    operations: OperationService
    webhooks: WebhookService


@pytest.fixture
async def emitter(clean: tuple[str, str]) -> AsyncIterator[Emitter]:
    database_url, redis_url = clean
    env = worker_env(database_url, redis_url)
    settings = Settings(**{**env, "PROCESS_ROLE": "api"})  # type: ignore[arg-type]
    storage = SqlStorage(make_database(database_url))
    queue = build_queue(settings, build_broker(settings))
    operations = OperationService(storage, queue)
    client = OutboundClient(OutboundPolicy.parse(settings.OUTBOUND_ALLOWED_HOSTS))
    service = WebhookService(
        storage,
        operations.jobs,
        SecretBox(settings.secret_keys()),
        client,
        WebhookConfig(schedule=tuple(settings.webhook_retry_schedule())),
    )
    operations.events = service
    yield Emitter(storage, operations, service)
    await client.aclose()
    await queue.aclose()
    await storage.close()


def delivery_statuses(database_url: str) -> dict[str, int]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT status, count(*) FROM webhook_deliveries GROUP BY status"
        ).fetchall()
    return {status: count for status, count in rows}


def delivering_worker(database_url: str, event_id: str) -> str:
    """The lease owner of the running delivery job of `event_id`."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT o.lease_owner FROM operations o "
            "JOIN webhook_deliveries d ON o.input->>'delivery_id' = d.id "
            "WHERE d.event_id = %s AND o.status = 'running'",
            (event_id,),
        ).fetchone()
    assert row is not None and row[0], f"no running delivery of event {event_id}"
    return str(row[0])


async def test_killing_a_worker_mid_delivery_loses_no_event(
    clean: tuple[str, str], emitter: Emitter, processes: Processes
) -> None:
    database_url, redis_url = clean

    # Once `hold` is set, requests wait unanswered until `release` is: the worker sending one
    # then certainly holds its delivery when it is killed.
    hold, release = threading.Event(), threading.Event()
    held: list[str] = []

    async def slow_ok(request: Received) -> Reply:
        if hold.is_set() and not release.is_set():
            held.append(request.headers["webhook-id"])
            await asyncio.to_thread(release.wait, 30)
        else:
            await asyncio.sleep(0.1)
        return 200, b"ok"

    with ThreadedReceiver(slow_ok) as receiver:
        _, secret = await emitter.webhooks.create(url=receiver.url)
        for n in range(EVENTS):
            async with emitter.storage.unit_of_work() as uow:
                await emitter.webhooks.record(uow, "api_key.created", {"n": n})
                await uow.commit()
        with psycopg.connect(database_url) as conn:
            event_ids = [r[0] for r in conn.execute("SELECT event_id FROM webhook_deliveries")]
        assert len(event_ids) == EVENTS
        # Jobs finished by the workers emit `operation.*` events through their runner.
        chat = {"model": "mock", "messages": [{"role": "user", "content": "hi"}]}
        jobs = [
            (
                await emitter.operations.submit(
                    kind=OperationKind.CHAT_COMPLETION, input=chat, owner=Owner(key_id="k")
                )
            )[0].id
            for _ in range(JOBS)
        ]

        env = worker_env(database_url, redis_url)
        for _ in range(2):
            processes.start(["worker", "--processes", "1", "--threads", "4"], env)
        await asyncio.to_thread(
            wait_until, lambda: delivery_statuses(database_url).get("succeeded", 0) >= 10, 60
        )
        hold.set()
        await asyncio.to_thread(wait_until, lambda: bool(held), 30, 0.01)
        owner = await asyncio.to_thread(delivering_worker, database_url, held[0])
        os.kill(int(owner.rsplit("-", 1)[1]), signal.SIGKILL)
        killed_at = time.monotonic()
        release.set()
        await asyncio.to_thread(
            wait_until,
            lambda: delivery_statuses(database_url) == {"succeeded": EVENTS + JOBS},
            90,
        )
        recovery = time.monotonic() - killed_at
        received = list(receiver.requests)

    assert recovery < 60
    seen = {r.headers["webhook-id"] for r in received}
    assert set(event_ids) <= seen, "an event was never delivered"
    finished = {
        orjson.loads(r.body)["data"]["operation"]["id"]
        for r in received
        if orjson.loads(r.body)["type"].startswith("operation.")
    }
    assert finished == set(jobs)
    for request in received:
        verify(secret, request.headers, request.body)
    # Duplicates are allowed (at least once); a receiver dedupes them by webhook-id.
    by_id: dict[str, set[bytes]] = {}
    for request in received:
        by_id.setdefault(request.headers["webhook-id"], set()).add(
            orjson.dumps(orjson.loads(request.body)["data"])
        )
    assert all(len(bodies) == 1 for bodies in by_id.values())
    with psycopg.connect(database_url) as conn:
        lost = conn.execute(
            "SELECT count(*) FROM operations WHERE kind = 'webhook_delivery' "
            "AND attempt_log::text LIKE '%\"lost\"%'"
        ).fetchone()
    assert lost is not None and lost[0] >= 1, "the killed worker held no delivery: proved nothing"

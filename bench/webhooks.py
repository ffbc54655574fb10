"""Webhook deliveries: throughput to a fast local receiver, and delay from event to first attempt.

Run `python -m bench.webhooks`. It uses only loopback services: a fresh PostgreSQL database
(`gateway_bench_webhooks`, created, migrated and dropped at the end), Redis database 11
(flushed at start and end), a receiver on a thread of this process, and one
`gateway worker --processes 1 --threads 8`, killed on the way out.

1. throughput: a backlog of events emitted at once by 16 concurrent emitters; deliveries/s is
   measured between the 10th and 90th percentile of arrivals (start-up and tail excluded)
2. delay: events emitted one by one at a steady rate; delay = arrival at the receiver minus the
   event's timestamp (recorded in the emitting transaction, before commit)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import orjson
import psycopg
import redis
from psycopg import sql

from app.config import Settings
from app.core.crypto import SecretBox
from app.core.outbound import OutboundClient, OutboundPolicy
from app.operations.service import OperationService
from app.queue.broker import build_broker
from app.queue.port import DramatiqQueue
from app.storage.migrate import upgrade_to_head
from app.storage.sql import SqlStorage, make_database
from app.webhooks.service import WebhookConfig, WebhookService

ROOT = Path(__file__).resolve().parent.parent
DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/gateway_bench_webhooks"
ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/11"
THROUGHPUT_EVENTS = 1000
DELAY_EVENTS = 100
DELAY_RATE = 5  # events per second: well under the throughput, so nothing queues
ENV = {
    "STORAGE_BACKEND": "postgres",
    "DATABASE_URL": DATABASE_URL,
    "REDIS_URL": REDIS_URL,
    "BROKER": "redis",
    "SECRET_KEY": "bench-secret-webhooks",
    "OUTBOUND_ALLOWED_HOSTS": "127.0.0.1",
    "LOG_LEVEL": "WARNING",
}


class FastReceiver:
    """Answers 204 at once; notes when each `webhook-id` first arrived (wall clock)."""

    def __init__(self) -> None:
        self.arrivals: dict[str, float] = {}
        self.sent_at: dict[str, float] = {}
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> str:
        self._thread.start()
        server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0), self._loop
        ).result(5)
        self.port = server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{self.port}/hook"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(
            asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError
        ):
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
                headers = dict(
                    line.split(": ", 1) for line in head.split("\r\n")[1:] if ": " in line
                )
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                now = time.time()
                event_id = headers["webhook-id"]
                if event_id not in self.arrivals:
                    self.arrivals[event_id] = now
                    stamp = orjson.loads(body)["timestamp"].replace("Z", "+00:00")
                    self.sent_at[event_id] = datetime.fromisoformat(stamp).timestamp()
                writer.write(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")
                await writer.drain()
        writer.close()

    def stop(self) -> None:
        async def cancel_connections() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(cancel_connections(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def recreate_database() -> None:
    name = sql.Identifier("gateway_bench_webhooks")
    with psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=3) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(name))


def drop_database() -> None:
    name = sql.Identifier("gateway_bench_webhooks")
    with psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=3) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name))


def start_worker(logs: Path) -> subprocess.Popen[bytes]:
    log = (logs / "worker.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "app", "worker", "--processes", "1", "--threads", "8"],
        cwd=ROOT,
        env={**os.environ, **ENV},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    return proc


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


async def wait_for(count: int, receiver: FastReceiver, patience: float) -> None:
    deadline = time.monotonic() + patience
    while len(receiver.arrivals) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(receiver.arrivals)} of {count} events arrived")
        await asyncio.sleep(0.02)


def percentile_ms(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000


async def run(logs: Path) -> None:
    settings = Settings(**{**ENV, "PROCESS_ROLE": "api"})  # type: ignore[arg-type]
    storage = SqlStorage(make_database(DATABASE_URL, pool_size=20, max_overflow=0))
    operations = OperationService(storage, DramatiqQueue(build_broker(settings)))
    client = OutboundClient(OutboundPolicy.parse(settings.OUTBOUND_ALLOWED_HOSTS))
    webhooks = WebhookService(
        storage, operations.jobs, SecretBox(settings.secret_keys()), client, WebhookConfig()
    )
    operations.events = webhooks
    receiver = FastReceiver()
    url = receiver.start()
    worker = start_worker(logs)

    async def emit(n: int) -> None:
        async with storage.unit_of_work() as uow:
            await webhooks.record(uow, "api_key.created", {"n": n})
            await uow.commit()

    try:
        await webhooks.create(url=url)
        for n in range(16):  # warm-up: the worker boots, opens its connections
            await emit(-n)
        await wait_for(16, receiver, 60)
        receiver.arrivals.clear()

        emitting = time.perf_counter()
        pending = list(range(THROUGHPUT_EVENTS))

        async def emitter() -> None:
            while pending:
                await emit(pending.pop())

        await asyncio.gather(*(emitter() for _ in range(16)))
        emitted_in = time.perf_counter() - emitting
        await wait_for(THROUGHPUT_EVENTS, receiver, 300)
        times = sorted(receiver.arrivals.values())
        low, high = times[len(times) // 10], times[len(times) * 9 // 10]
        rate = (len(times) * 8 // 10) / (high - low)
        total = times[-1] - times[0]
        print(
            f"throughput: {THROUGHPUT_EVENTS} events emitted in {emitted_in:.2f} s "
            f"({THROUGHPUT_EVENTS / emitted_in:,.0f}/s by 16 emitters); delivered at "
            f"{rate:,.0f}/s (10th-90th percentile of arrivals), all in {total:.2f} s"
        )

        receiver.arrivals.clear()
        receiver.sent_at.clear()
        for n in range(DELAY_EVENTS):
            began = time.perf_counter()
            await emit(n)
            await asyncio.sleep(max(0.0, 1 / DELAY_RATE - (time.perf_counter() - began)))
        await wait_for(DELAY_EVENTS, receiver, 60)
        delays = [receiver.arrivals[k] - receiver.sent_at[k] for k in receiver.arrivals]
        print(
            f"delay from event to first attempt ({DELAY_EVENTS} events at {DELAY_RATE}/s): "
            f"p50 {percentile_ms(delays, 50):.1f} ms, p99 {percentile_ms(delays, 99):.1f} ms, "
            f"max {max(delays) * 1000:.1f} ms"
        )
    finally:
        stop_worker(worker)
        receiver.stop()
        await client.aclose()
        await storage.close()


def main() -> int:
    r = redis.Redis.from_url(REDIS_URL)
    try:
        r.ping()
        recreate_database()
    except (redis.RedisError, psycopg.OperationalError) as exc:
        print(f"PostgreSQL or Redis is not reachable: {exc}", file=sys.stderr)
        return 1
    r.flushdb()
    logs = Path(tempfile.mkdtemp(prefix="bench-webhooks-"))
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs; worker log in {logs}")
    try:
        upgrade_to_head(DATABASE_URL)
        asyncio.run(run(logs))
    finally:
        r.flushdb()
        drop_database()
    return 0


if __name__ == "__main__":
    sys.exit(main())

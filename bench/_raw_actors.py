"""Actors of the raw Dramatiq baseline in `bench/jobs.py`, run by `dramatiq bench._raw_actors`.

Nothing of the gateway is involved: a RedisBroker of its own (namespace `rawbench`), a no-op
actor and one doing a single INSERT, each counting itself done with a Redis INCR.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import dramatiq
import psycopg
import redis
from dramatiq.brokers.redis import RedisBroker

REDIS_URL = os.environ.get("RAW_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
DSN = os.environ.get("RAW_BENCH_DSN", "postgresql://postgres@127.0.0.1:5432/gateway_bench_jobs")
QUEUE = "raw"
DONE = "rawbench:done"
BOOTED = "rawbench:booted"
TABLE = "raw_jobs"

client = redis.Redis.from_url(REDIS_URL)


class Booted(dramatiq.Middleware):
    """Counts worker processes that finished booting, so the bench knows when to start."""

    def after_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        client.incr(BOOTED)


broker = RedisBroker(client=client, namespace="rawbench")  # type: ignore[no-untyped-call]
broker.add_middleware(Booted())
dramatiq.set_broker(broker)

_local = threading.local()


def _connection() -> psycopg.Connection[Any]:
    """One autocommit connection per worker thread."""
    conn = getattr(_local, "conn", None)
    if conn is None:
        conn = psycopg.connect(DSN, autocommit=True)
        _local.conn = conn
    return conn


@dramatiq.actor(queue_name=QUEUE, max_retries=0)
def noop(n: int) -> None:
    client.incr(DONE)


@dramatiq.actor(queue_name=QUEUE, max_retries=0)
def insert(n: int) -> None:
    _connection().execute(f"INSERT INTO {TABLE} (n) VALUES (%s)", (n,))
    client.incr(DONE)

"""One gateway process for bench/gateway.py, set up as production runs it.

PostgreSQL storage (a fresh database), the Redis broker and a real Redis database, and a
caller whose every check does real work: an API key of a team, limited to the bench model,
with rate limits on the key and the team and a team budget on a priced model, so each call
runs authentication, the permission check, the rate-limit and budget script, and commits a
usage record and an execution log (and the budget's spend) before it answers.

`python -m bench.gateway_server prepare UPSTREAM_URL` recreates the database and Redis data
and seeds them; `python -m bench.gateway_server serve PORT` serves with one uvicorn worker
(with `BENCH_METRICS=off`, recording no metric: the figures to set beside the recorded ones).
"""

from __future__ import annotations

import asyncio
import os
import sys
from decimal import Decimal
from typing import Any

import psycopg
import redis
import uvicorn
from psycopg import sql

from app.access.permissions import KeyPermissions
from app.config import Settings
from app.credentials.entities import Provider, StoredCredential
from app.main import create_app
from app.models.entities import Model
from app.queue.broker import build_broker
from app.queue.port import DramatiqQueue
from app.services import build_services
from app.storage.factory import build_storage
from app.storage.migrate import upgrade_to_head
from app.usage.entities import BudgetPeriod, BudgetScope

DATABASE_URL = os.environ.get(
    "BENCH_GATEWAY_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/gateway_bench_gateway"
)
REDIS_URL = os.environ.get("BENCH_GATEWAY_REDIS_URL", "redis://127.0.0.1:6379/12")
KEY = "gw-bench-team-key-0123456789abcdefghijklmnop"
ADMIN = "gw-bench-admin-key-0123456789abcdefghij"
MODEL = "bench"
# High enough never to refuse a bench call, so every call takes the full admitted path.
KEY_LIMITS = {"requests_per_minute": 10_000_000, "tokens_per_minute": 1_000_000_000}
TEAM_LIMITS = {"requests_per_day": 100_000_000}
BUDGET_MICROS = 10**15
# The upstream's key, read by both the seeding and the serving process.
os.environ.setdefault("BENCH_UPSTREAM_KEY", "sk-bench")


def settings() -> Settings:
    return Settings(
        PROCESS_ROLE="api",
        STORAGE_BACKEND="postgres",
        DATABASE_URL=DATABASE_URL,
        BROKER="redis",
        REDIS_URL=REDIS_URL,
        SECRET_KEY="bench-secret-key-not-for-production-0123456789",
        ADMIN_API_KEY=ADMIN,
        ADMIN_DEFAULT_PASSWORD="bench-admin-password",
        LOG_LEVEL="WARNING",
        # The benchmark's upstream runs on this machine, which provider calls refuse unless listed.
        OUTBOUND_ALLOWED_HOSTS="127.0.0.1,::1,localhost",
    )


def recreate_database() -> None:
    base, _, name = DATABASE_URL.rpartition("/")
    with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
        ident = sql.Identifier(name)
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(ident))
    upgrade_to_head(DATABASE_URL)


async def seed(upstream: str) -> None:
    config = settings()
    storage = build_storage(config)
    client: Any = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        services = build_services(config, storage, DramatiqQueue(build_broker(config)), client)
        async with storage.unit_of_work() as uow:
            await uow.repo(StoredCredential).add(
                StoredCredential(
                    id="bench",
                    name="bench",
                    provider=Provider.OPENAI,
                    env_var="BENCH_UPSTREAM_KEY",
                    endpoint=upstream + "/v1",
                )
            )
            await uow.repo(Model).add(
                Model(
                    id=MODEL,
                    name=MODEL,
                    provider=Provider.OPENAI,
                    provider_model=MODEL,
                    credential_id="bench",
                    parameters={"max_retries": 0},
                    input_price_per_million=Decimal("0.15"),
                    output_price_per_million=Decimal("0.60"),
                )
            )
            await uow.commit()
        team = await services.teams.create_team(name="bench", rate_limits=TEAM_LIMITS)
        await services.keys.create_key(
            name="bench",
            team_id=team.id,
            secret=KEY,
            permissions=KeyPermissions(models=[MODEL]),
            rate_limits=KEY_LIMITS,
        )
        await services.accounting.budgets.create(
            name="bench",
            scope=BudgetScope.TEAM,
            scope_id=team.id,
            period=BudgetPeriod.MONTHLY,
            hard_limit_micros=BUDGET_MICROS,
        )
        await services.metering.close()
    finally:
        await client.aclose()
        await storage.close()


def prepare(upstream: str) -> None:
    redis.Redis.from_url(REDIS_URL).flushdb()
    recreate_database()
    asyncio.run(seed(upstream))


def recorded_usage() -> tuple[int, int]:
    """Usage records and execution logs in the database."""
    with psycopg.connect(DATABASE_URL) as conn:
        records = conn.execute("SELECT count(*) FROM usage_records").fetchone()
        logs = conn.execute("SELECT count(*) FROM execution_logs").fetchone()
    assert records is not None and logs is not None
    return int(records[0]), int(logs[0])


class _Unrecorded:
    """A metric child that records nothing."""

    def inc(self, amount: float = 1) -> None:
        return None

    def observe(self, amount: float) -> None:
        return None

    def set(self, value: float) -> None:
        return None


def unrecorded_metrics() -> None:
    """Make every metric of the process record nothing: each call site still looks its child
    up through `Family` (app/core/metrics.py), and gets this one instead."""
    from app.core.metrics import Family

    nothing = _Unrecorded()
    Family.__call__ = lambda self, *values: nothing  # type: ignore[method-assign]


def serve(port: int) -> None:
    if os.environ.get("BENCH_METRICS", "on") == "off":
        unrecorded_metrics()
    uvicorn.run(
        create_app(settings()),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        loop="uvloop",
        http="httptools",
    )


def main() -> None:
    if sys.argv[1] == "prepare":
        prepare(sys.argv[2])
    else:
        serve(int(sys.argv[2]))


if __name__ == "__main__":
    main()

"""Workflow runs in real PostgreSQL, Redis and worker processes: a worker killed with SIGKILL in
the middle of a step leaves the run to resume at that step in another worker, and a run
cancelled in the middle of a step stops there."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest

from app.config import Settings
from app.core.redis import build_redis
from app.credentials.entities import Provider
from app.operations.entities import OperationStatus
from app.operations.submit import Owner
from app.queue.broker import build_broker
from app.queue.port import build_queue
from app.services import Services, build_services
from app.storage.sql import SqlStorage, make_database
from app.workflows.schemas import WorkflowCreate
from tests.gateway.conftest import UPSTREAM_SECRET, store_models
from tests.gateway.upstream import FakeUpstream, UpstreamThread
from tests.processes import ADMIN_KEY, Processes, env_for, wait_until

pytestmark = pytest.mark.slow

TEXTS = ["one", "two", "three", "four", "five"]
# Each chat call takes this long at the upstream: long enough to kill a worker inside one.
CALL_SECONDS = 1.0


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    thread = UpstreamThread()
    yield thread.start()
    thread.stop()


def worker_env(database_url: str, redis_url: str) -> dict[str, str]:
    return env_for(
        database_url,
        redis_url,
        OUTBOUND_ALLOWED_HOSTS="127.0.0.1",
        UPSTREAM_TIMEOUT_SECONDS="10",
        GATEWAY_TEST_UPSTREAM_KEY=UPSTREAM_SECRET,
    )


@pytest.fixture
async def api_side(clean: tuple[str, str], upstream: FakeUpstream) -> AsyncIterator[Services]:
    """The services of an API process, on the database and Redis the workers use."""
    database_url, redis_url = clean
    settings = Settings(**{**worker_env(database_url, redis_url), "PROCESS_ROLE": "api"})  # type: ignore[arg-type]
    storage = SqlStorage(make_database(database_url))
    queue = build_queue(settings, build_broker(settings))
    client = build_redis(settings)
    services = build_services(settings, storage, queue, client)
    await services.keys.ensure_key(key_id="admin", name="admin", secret=ADMIN_KEY, admin=True)
    await store_models(storage, upstream, ("llm", Provider.OPENAI, {}))
    yield services
    await services.aclose()
    await client.aclose()
    await queue.aclose()
    await storage.close()


def said(upstream: FakeUpstream, text: str) -> int:
    return sum(1 for s in upstream.seen if s.body["messages"][-1].get("content") == text)


def recorded(database_url: str, operation_id: str) -> list[tuple[str, str]]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT step_name, status FROM workflow_step_runs WHERE operation_id = %s "
            "ORDER BY position",
            (operation_id,),
        ).fetchall()
    return [(name, status) for name, status in rows]


def usage_rows(database_url: str, operation_id: str) -> tuple[int, int]:
    """How many usage records and execution logs the run's calls left."""
    with psycopg.connect(database_url) as conn:
        counts = [
            conn.execute(
                f"SELECT count(*) FROM {table} WHERE operation_id = %s", (operation_id,)
            ).fetchone()
            for table in ("usage_records", "execution_logs")
        ]
    return counts[0][0] if counts[0] else 0, counts[1][0] if counts[1] else 0


def operation_row(database_url: str, operation_id: str) -> tuple[str, list[dict[str, str]]]:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT status, attempt_log FROM operations WHERE id = %s", (operation_id,)
        ).fetchone()
    assert row is not None
    return row[0], row[1]


async def test_a_worker_killed_mid_step_leaves_the_run_to_resume_at_that_step(
    clean: tuple[str, str], api_side: Services, upstream: FakeUpstream, processes: Processes
) -> None:
    database_url, redis_url = clean
    env = worker_env(database_url, redis_url)
    steps = [
        {"name": f"s{n}", "type": "chat_completion", "model_id": "llm", "user_message": text}
        for n, text in enumerate(TEXTS, 1)
    ]
    await api_side.workflows.create(WorkflowCreate(id="five", name="five", steps=steps))
    principal = await api_side.keys.authenticate(ADMIN_KEY)
    upstream.delays["up-llm"] = CALL_SECONDS
    first = processes.start(["worker", "--processes", "1", "--threads", "2"], env)
    operation, _ = await api_side.workflows.submit(principal, "five", None)

    # Step 3's call is at the upstream, steps 1 and 2 are recorded: kill the worker now.
    def inside_step_three() -> bool:
        return said(upstream, "three") == 1 and len(recorded(database_url, operation.id)) == 2

    await asyncio.to_thread(wait_until, inside_step_three, 30, 0.02)
    processes.kill(first)
    killed_at = time.monotonic()
    processes.start(["worker", "--processes", "1", "--threads", "2"], env)

    def finished() -> bool:
        return operation_row(database_url, operation.id)[0] in ("completed", "failed")

    await asyncio.to_thread(wait_until, finished, 60, 0.1)
    status, attempt_log = operation_row(database_url, operation.id)
    assert status == "completed", attempt_log
    assert [e["outcome"] for e in attempt_log] == ["lost", "completed"]
    assert time.monotonic() - killed_at < 2 + 10 + len(TEXTS) * CALL_SECONDS
    assert recorded(database_url, operation.id) == [(f"s{n}", "completed") for n in range(1, 6)]
    # The steps recorded before the kill were not run again; the one cut off was, once.
    calls = {text: said(upstream, text) for text in TEXTS}
    assert calls == {"one": 1, "two": 1, "three": 2, "four": 1, "five": 1}
    # Each recorded step's call is paid for once: the two before the kill committed their usage
    # with their records, and the call the killed attempt cut off left none.
    assert usage_rows(database_url, operation.id) == (5, 5)


# Slow enough that the cancellation lands while step 2's call is still at the upstream, and that
# the worker's heartbeat (a third of the two-second lease) notices it before the call ends.
SLOW_CALL_SECONDS = 2.5


async def test_cancelling_a_run_mid_step_stops_it_there_and_no_later_step_is_called(
    clean: tuple[str, str], api_side: Services, upstream: FakeUpstream, processes: Processes
) -> None:
    database_url, redis_url = clean
    env = worker_env(database_url, redis_url)
    steps = [
        {"name": f"s{n}", "type": "chat_completion", "model_id": "llm", "user_message": text}
        for n, text in enumerate(TEXTS, 1)
    ]
    await api_side.workflows.create(WorkflowCreate(id="five", name="five", steps=steps))
    principal = await api_side.keys.authenticate(ADMIN_KEY)
    upstream.delays["up-llm"] = SLOW_CALL_SECONDS
    processes.start(["worker", "--processes", "1", "--threads", "2"], env)
    operation, _ = await api_side.workflows.submit(principal, "five", None)

    def inside_step_two() -> bool:
        return said(upstream, "two") == 1 and len(recorded(database_url, operation.id)) == 1

    await asyncio.to_thread(wait_until, inside_step_two, 30, 0.02)
    owner = Owner(key_id=principal.key_id, team_id=principal.team_id, admin=True)
    cancelled = await api_side.operations.cancel(operation.id, owner=owner)
    assert cancelled.status == OperationStatus.CANCELLED

    # Had the run gone on, step 2's call would have ended and step 3's begun by now.
    await asyncio.sleep(SLOW_CALL_SECONDS + 2)
    status, attempt_log = operation_row(database_url, operation.id)
    assert status == "cancelled", attempt_log
    assert {text: said(upstream, text) for text in TEXTS} == {
        "one": 1,
        "two": 1,
        "three": 0,
        "four": 0,
        "five": 0,
    }
    # Step 1 keeps its record and its usage; step 2, aborted in flight, left neither.
    assert recorded(database_url, operation.id) == [("s1", "completed")]
    assert usage_rows(database_url, operation.id) == (1, 1)

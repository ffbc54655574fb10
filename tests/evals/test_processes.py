"""A suite run on real workers, PostgreSQL and Redis survives its worker's SIGKILL: another worker
resumes it, and no case that had finished runs again."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator

import psycopg
import pytest

from app.config import Settings
from app.credentials.entities import Provider
from app.storage.sql import SqlStorage, make_database
from tests.gateway.conftest import store_models
from tests.gateway.upstream import FakeUpstream, UpstreamThread
from tests.operations.test_processes import (
    ADMIN_KEY,
    Processes,
    env_for,
    httpx_client,
    wait_until,
)

pytestmark = pytest.mark.slow

CASES = 40
CONCURRENCY = 4
UPSTREAM_DELAY = 0.25  # seconds per call: the run takes a few seconds on one worker


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    thread = UpstreamThread()
    server = thread.start()
    server.delays["up-slow"] = UPSTREAM_DELAY
    yield server
    thread.stop()


def results(database_url: str, run_id: str) -> list[str]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT test_case_id FROM test_case_results WHERE run_id = %s", (run_id,)
        ).fetchall()
    return [case_id for (case_id,) in rows]


def job(database_url: str, operation_id: str) -> tuple[str, int, list[dict[str, str]], str]:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT status, attempts, attempt_log, lease_owner FROM operations WHERE id = %s",
            (operation_id,),
        ).fetchone()
    assert row is not None
    return row[0], row[1], row[2], row[3] or ""


async def test_a_suite_run_resumes_on_another_worker_after_a_sigkill_without_rerunning_cases(
    clean: tuple[str, str],
    processes: Processes,
    upstream: FakeUpstream,
) -> None:
    database_url, redis_url = clean
    secret_env = {"GATEWAY_TEST_UPSTREAM_KEY": "sk-upstream-secret-never-shown-4242"}
    storage = SqlStorage(make_database(database_url))
    await store_models(storage, upstream, ("slow", Provider.OPENAI, {}))
    await storage.close()
    env = env_for(database_url, redis_url, OUTBOUND_ALLOWED_HOSTS="127.0.0.1", **secret_env)
    settings = Settings(**{**env, "PROCESS_ROLE": "api"})  # type: ignore[arg-type]
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}

    with httpx_client(settings) as api:
        for i in range(CASES):
            created = api.post(
                "/admin/test-cases",
                json={
                    "id": f"case-{i}",
                    "input": {"user_message": f"case {i}"},
                    "assertions": [{"type": "contains", "value": f"case {i}"}],
                },
                headers=headers,
            )
            assert created.status_code == 201, created.text
        suite = {
            "id": "nightly",
            "case_ids": [f"case-{i}" for i in range(CASES)],
            "default_target": {"type": "model", "model": "slow"},
            "concurrency": CONCURRENCY,
        }
        assert api.post("/admin/test-suites", json=suite, headers=headers).status_code == 201
        accepted = api.post("/admin/test-suites/nightly/runs", headers=headers)
        assert accepted.status_code == 202, accepted.text
        run_id, operation_id = accepted.json()["id"], accepted.json()["operation_id"]

        first = processes.start(["worker", "--processes", "1", "--threads", "4"], env)
        await asyncio.to_thread(
            wait_until, lambda: len(results(database_url, run_id)) >= 8, 60, 0.02
        )
        processes.kill(first)  # SIGKILL to the whole worker, mid-run
        done_before_kill = set(results(database_url, run_id))
        assert len(done_before_kill) < CASES, "the run ended before the kill: nothing proved"
        killed_at = time.monotonic()

        processes.start(["worker", "--processes", "1", "--threads", "4"], env)
        await asyncio.to_thread(
            wait_until, lambda: job(database_url, operation_id)[0] == "completed", 60
        )
        resumed_in = time.monotonic() - killed_at
        run = api.get(f"/admin/test-suites/nightly/runs/{run_id}", headers=headers).json()

    assert run["status"] == "completed" and run["passed"] is True, run
    assert run["progress"]["done"] == CASES and run["progress"]["passed"] == CASES
    kept = results(database_url, run_id)
    assert sorted(kept) == sorted(f"case-{i}" for i in range(CASES))  # one result per case
    _, attempts, attempt_log, _ = job(database_url, operation_id)
    assert attempts == 2 and [e["outcome"] for e in attempt_log] == ["lost", "completed"]

    calls = Counter(str(seen.body["messages"][-1]["content"]) for seen in upstream.seen)
    for case_id in done_before_kill:
        assert calls[case_id.replace("-", " ")] == 1, f"{case_id} finished, yet ran again"
    again = [case for case, count in calls.items() if count > 1]
    # Only the calls in flight when the worker died are made twice, never a finished case's.
    assert len(again) <= CONCURRENCY, again
    assert all(calls[f"case {i}"] >= 1 for i in range(CASES))
    assert sum(calls.values()) <= CASES + CONCURRENCY
    print(f"resumed and completed {resumed_in:.1f} s after the kill; re-run in flight: {again}")

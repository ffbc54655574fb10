"""A suite run on real workers, PostgreSQL and Redis: its cases fan out over four worker
processes, one of them is SIGKILLed mid-run, and the run still completes with one result (and
one charge) per case, no case that had finished called again; the comparison with a run of the
next prompt version lists exactly the cases that regressed."""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections import Counter
from collections.abc import Iterator

import psycopg
import pytest
import redis

from app.config import Settings
from app.credentials.entities import Provider
from app.operations.presence import PRESENCE_KEY
from app.storage.sql import SqlStorage, make_database
from tests.gateway.conftest import store_models
from tests.gateway.upstream import FakeUpstream, UpstreamThread
from tests.processes import (
    ADMIN_KEY,
    Processes,
    env_for,
    httpx_client,
    wait_until,
)

pytestmark = pytest.mark.slow

CASES = 100
WORKERS = 4
THREADS = 2
CONCURRENCY = 8  # as many cases at once as the four workers have threads
UPSTREAM_DELAY = 0.15  # seconds per call: the run lasts a few seconds
WARM = "Reply warmly to case ${var:n}"
COLD = "Reply to case ${var:n}"
# Every third case checks the warmth the second prompt version drops: those regress.
REGRESSING = {f"case-{i}" for i in range(CASES) if i % 3 == 0}


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    thread = UpstreamThread()
    server = thread.start()
    server.delays["up-slow"] = UPSTREAM_DELAY
    yield server
    thread.stop()


def query(database_url: str, sql: str, *args: object) -> list[tuple[object, ...]]:
    with psycopg.connect(database_url) as conn:
        return list(conn.execute(sql, args).fetchall())


def results(database_url: str, run_id: str) -> list[str]:
    rows = query(
        database_url, "SELECT test_case_id FROM test_case_results WHERE run_id = %s", run_id
    )
    return [str(case_id) for (case_id,) in rows]


def status(database_url: str, operation_id: str) -> str:
    return str(
        query(database_url, "SELECT status FROM operations WHERE id = %s", operation_id)[0][0]
    )


def running_owner(database_url: str, parent_id: str) -> str:
    """The worker (`host-pid`) holding one of the parent's children right now."""
    found: list[str] = []

    def holding() -> bool:
        rows = query(
            database_url,
            "SELECT lease_owner FROM operations WHERE parent_id = %s AND status = 'running' "
            "AND lease_owner IS NOT NULL LIMIT 1",
            parent_id,
        )
        found.extend(str(owner) for (owner,) in rows)
        return bool(found)

    wait_until(holding, 10, 0.01)
    return found[0]


def calls_per_case(upstream: FakeUpstream, marker: str) -> Counter[str]:
    """Upstream calls per case id, of the prompt version whose text holds `marker`."""
    counted: Counter[str] = Counter()
    for seen in list(upstream.seen):
        text = str(seen.body["messages"][-1]["content"])
        found = re.search(r"case (\d+)$", text)
        if found and marker in text:
            counted[f"case-{found.group(1)}"] += 1
    return counted


async def test_a_hundred_cases_on_four_workers_survive_a_sigkill_and_compare_exactly(
    clean: tuple[str, str],
    processes: Processes,
    upstream: FakeUpstream,
) -> None:
    database_url, redis_url = clean
    storage = SqlStorage(make_database(database_url))
    await store_models(storage, upstream, ("slow", Provider.OPENAI, {}))
    await storage.close()
    env = env_for(
        database_url,
        redis_url,
        OUTBOUND_ALLOWED_HOSTS="127.0.0.1",
        GATEWAY_TEST_UPSTREAM_KEY="sk-upstream-secret-never-shown-4242",
    )
    settings = Settings(**{**env, "PROCESS_ROLE": "api"})  # type: ignore[arg-type]
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    workers = [
        processes.start(["worker", "--processes", "1", "--threads", str(THREADS)], env)
        for _ in range(WORKERS)
    ]
    target = {"type": "prompt", "prompt_id": "greeter", "model": "slow"}

    with httpx_client(settings) as api:

        def post(path: str, body: object, expected: int) -> dict[str, object]:
            response = api.post(path, json=body, headers=headers)
            assert response.status_code == expected, response.text
            return dict(response.json())

        post("/admin/prompts", {"id": "greeter", "content": WARM}, 201)
        for i in range(CASES):
            check = "warmly" if f"case-{i}" in REGRESSING else f"case {i}"
            body = {
                "id": f"case-{i}",
                "input": {"variables": {"n": i}},
                "assertions": [{"type": "contains", "value": check}],
            }
            post("/admin/test-cases", body, 201)
        suite = {
            "id": "nightly",
            "case_ids": [f"case-{i}" for i in range(CASES)],
            "default_target": target,
            "concurrency": CONCURRENCY,
        }
        post("/admin/test-suites", suite, 201)
        presence = redis.Redis.from_url(redis_url)
        await asyncio.to_thread(
            wait_until, lambda: presence.zcard(PRESENCE_KEY) >= WORKERS, 30, 0.1
        )

        first = post("/admin/test-suites/nightly/runs", {"target": {**target, "version": 1}}, 202)
        run_id, parent_id = str(first["id"]), str(first["operation_id"])
        await asyncio.to_thread(
            wait_until, lambda: len(results(database_url, run_id)) >= 20, 30, 0.02
        )
        # SIGKILL the worker (its whole process group) holding a case's job right now.
        owner = await asyncio.to_thread(running_owner, database_url, parent_id)
        group = os.getpgid(int(owner.rsplit("-", 1)[1]))
        (victim,) = [w for w in workers if w.pid == group]
        processes.kill(victim)
        committed_before_kill = set(results(database_url, run_id))
        assert len(committed_before_kill) < CASES, "the run ended before the kill: nothing proved"
        killed_at = time.monotonic()

        await asyncio.to_thread(
            wait_until, lambda: status(database_url, parent_id) == "completed", 40
        )
        recovered_in = time.monotonic() - killed_at
        run = api.get(f"/admin/test-runs/{run_id}", headers=headers).json()

        # The next prompt version, run against the same cases, and the two runs compared.
        api.patch("/admin/prompts/greeter", json={"content": COLD}, headers=headers)
        second = post("/admin/test-suites/nightly/runs", {"target": {**target, "version": 2}}, 202)
        await asyncio.to_thread(
            wait_until, lambda: status(database_url, str(second["operation_id"])) == "completed", 40
        )
        compared = api.get(
            f"/admin/test-suites/nightly/runs/{second['id']}/compare?baseline={run_id}",
            headers=headers,
        ).json()

    assert run["status"] == "completed" and run["passed"] is True, run
    assert run["progress"] == {
        "total": CASES, "done": CASES, "passed": CASES, "failed": 0, "errored": 0,
    }  # fmt: skip
    kept = results(database_url, run_id)
    assert sorted(kept) == sorted(f"case-{i}" for i in range(CASES))  # exactly one per case

    calls = calls_per_case(upstream, "warmly")
    for case_id in committed_before_kill:
        assert calls[case_id] == 1, f"{case_id} had its result, yet was called again"
    again = sorted(case for case, count in calls.items() if count > 1)
    # Only the cases in flight on the killed worker (at most its threads, plus what it had
    # prefetched and begun) are called twice.
    assert all(calls[f"case-{i}"] >= 1 for i in range(CASES))
    assert len(again) <= THREADS, again

    # One usage record per result, from the attempt that kept it: a case called twice is
    # charged once.
    charged = query(
        database_url,
        "SELECT u.operation_id, count(*) FROM usage_records u "
        "JOIN operations o ON o.id = u.operation_id WHERE o.parent_id = %s "
        "GROUP BY u.operation_id",
        parent_id,
    )
    assert len(charged) == CASES and all(count == 1 for _, count in charged)
    producers = query(
        database_url, "SELECT operation_id FROM test_case_results WHERE run_id = %s", run_id
    )
    assert {op for (op,) in producers} == {op for op, _ in charged}

    # The cases ran on several worker processes; the killed one's jobs were taken over.
    entries = [
        entry
        for (log,) in query(
            database_url, "SELECT attempt_log FROM operations WHERE parent_id = %s", parent_id
        )
        for entry in log  # type: ignore[attr-defined]
    ]
    ran_on = Counter(e["worker"] for e in entries if e.get("outcome") == "completed")
    assert len(ran_on) >= 2 and sum(ran_on.values()) == CASES, ran_on
    lost = [e for e in entries if e.get("outcome") == "lost"]
    assert lost and {e["worker"] for e in lost} == {owner}, lost

    assert sorted(c["test_case_id"] for c in compared["regressions"]) == sorted(REGRESSING)
    assert compared["improvements"] == []
    assert compared["unchanged"] == CASES - len(REGRESSING)
    print(
        f"completed {recovered_in:.1f} s after the kill; called twice: {again}; "
        f"cases per worker: {dict(ran_on)}"
    )

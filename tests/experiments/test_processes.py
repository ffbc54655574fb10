"""An experiment batch on real PostgreSQL, Redis and worker processes survives a SIGKILL of
its worker: another one finishes it, and every (item, variant) call is answered once."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson
import psycopg
import pytest
from aiohttp import web

from app.config import Settings
from app.credentials.entities import Provider
from app.storage.sql import SqlStorage, make_database
from tests.gateway.conftest import UPSTREAM_SECRET, store_models
from tests.gateway.upstream import FakeUpstream, UpstreamThread
from tests.processes import (
    ADMIN_KEY,
    Processes,
    env_for,
    httpx_client,
    wait_until,
)

pytestmark = pytest.mark.slow

ITEMS = 200
VARIANTS = 3
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@dataclass
class CountingUpstream(FakeUpstream):
    """An OpenAI upstream that answers after `delay`, counting the calls it answered per
    (model, message, temperature); clearing `released` holds calls until it is set again,
    and a call whose client is gone by then is counted as abandoned instead."""

    delay: float = 0.05
    answered: Counter[tuple[str, str, Any]] = field(default_factory=Counter)
    abandoned: list[tuple[str, str, Any]] = field(default_factory=list)
    held: int = 0
    released: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.released.set()

    async def openai_chat(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        key = (body["model"], body["messages"][-1]["content"], body.get("temperature"))
        await asyncio.sleep(self.delay)
        if not self.released.is_set():
            self.held += 1
            await asyncio.to_thread(self.released.wait)
        if request.transport is None or request.transport.is_closing():
            self.abandoned.append(key)
            return web.Response(status=499)
        self.answered[key] += 1
        return web.json_response(
            {
                "id": "chatcmpl-up",
                "object": "chat.completion",
                "created": 1,
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": f"echo: {key[1]}"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
            }
        )


@pytest.fixture
def upstream() -> Any:
    thread = UpstreamThread()
    thread.upstream = CountingUpstream(port=thread.upstream.port)
    yield thread.start()
    thread.stop()


async def _store_models(database_url: str, upstream: FakeUpstream) -> None:
    storage = SqlStorage(make_database(database_url))
    try:
        await store_models(
            storage, upstream, *((m, Provider.OPENAI, {}) for m in ("base", "other"))
        )
    finally:
        await storage.close()


def batch_state(database_url: str, operation_id: str) -> tuple[str, int, Any]:
    with psycopg.connect(database_url) as conn:
        status, log = conn.execute(
            "SELECT status, attempt_log FROM operations WHERE id = %s", (operation_id,)
        ).fetchone() or ("missing", [])
        (records,) = conn.execute(
            "SELECT count(*) FROM experiment_records WHERE operation_id = %s", (operation_id,)
        ).fetchone() or (0,)
    return status, records, log


def lease_owner(database_url: str, operation_id: str) -> str:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT lease_owner FROM operations WHERE id = %s", (operation_id,)
        ).fetchone()
    assert row is not None and row[0], "the batch is not held by a worker"
    return str(row[0])


def environment(database_url: str, redis_url: str, upstream: FakeUpstream) -> dict[str, str]:
    """The processes' settings, once the two models at `upstream` are stored."""
    asyncio.run(_store_models(database_url, upstream))
    return env_for(
        database_url,
        redis_url,
        OUTBOUND_ALLOWED_HOSTS="127.0.0.1",
        GATEWAY_TEST_UPSTREAM_KEY=UPSTREAM_SECRET,
        UPSTREAM_MAX_RETRIES="0",
    )


def post(api: Any, path: str, body: dict[str, Any], status: int = 200) -> Any:
    response = api.post(path, json=body, headers=ADMIN)
    assert response.status_code == status, response.text
    return response.json()


def prepare(api: Any) -> None:
    """A running experiment of three variants on `base`, and a dataset of `ITEMS` items."""
    post(
        api,
        "/admin/experiments",
        {
            "id": "kill",
            "name": "Survives a kill",
            "target_kind": "model",
            "target": "base",
            "variants": [
                {"id": "control", "allocation": 34, "control": True},
                {"id": "other", "allocation": 33, "model": "other"},
                {"id": "warm", "allocation": 33, "params": {"temperature": 1.0}},
            ],
        },
        201,
    )
    post(api, "/admin/experiments/kill/start", {})
    items = [
        {"input": {"messages": [{"role": "user", "content": f"item {i}"}]}} for i in range(ITEMS)
    ]
    post(api, "/admin/datasets", {"id": "two-hundred", "name": "200", "items": items}, 201)


def test_a_batch_whose_worker_is_killed_completes_with_each_call_answered_once(
    clean: tuple[str, str],
    processes: Processes,
    upstream: CountingUpstream,
) -> None:
    database_url, redis_url = clean
    env = environment(database_url, redis_url, upstream)
    settings = Settings(**{**env, "PROCESS_ROLE": "api"})  # type: ignore[arg-type]
    with httpx_client(settings) as api:
        prepare(api)
        first = processes.start(["worker", "--processes", "1", "--threads", "2"], env)
        accepted = post(
            api,
            "/admin/experiments/kill/batches",
            {"dataset_id": "two-hundred", "concurrency": 8},
            202,
        )
        operation_id = accepted["operation_id"]
        assert accepted["total"] == ITEMS * VARIANTS

        wait_until(lambda: batch_state(database_url, operation_id)[1] >= 150, 60, 0.05)
        # Hold the calls in flight, let every answer already sent be recorded, then kill.
        upstream.released.clear()
        time.sleep(0.5)
        wait_until(lambda: upstream.held >= 1, 10, 0.01)
        before = batch_state(database_url, operation_id)[1]
        owner = lease_owner(database_url, operation_id)
        os.kill(int(owner.rsplit("-", 1)[1]), signal.SIGKILL)
        time.sleep(0.5)  # the upstream sees the killed worker's connections close
        upstream.released.set()
        processes.kill(first)
        processes.start(["worker", "--processes", "1", "--threads", "2"], env)
        wait_until(lambda: batch_state(database_url, operation_id)[0] == "completed", 90, 0.1)

        _, records, log = batch_state(database_url, operation_id)
        polled = api.get(f"/v1/operations/{operation_id}", headers=ADMIN).json()
        results = api.get(
            f"/admin/experiments/kill/results?operation_id={operation_id}", headers=ADMIN
        ).json()

    assert before < ITEMS * VARIANTS, "the batch had finished before the kill"
    assert records == ITEMS * VARIANTS
    assert polled["result"]["recorded"] == polled["result"]["succeeded"] == ITEMS * VARIANTS
    assert [entry["outcome"] for entry in log] == ["lost", "completed"]
    assert upstream.abandoned, "no call was in flight at the kill: the test proved nothing"
    assert len(upstream.answered) == ITEMS * VARIANTS
    twice = {k: n for k, n in upstream.answered.items() if n != 1}
    assert not twice, f"answered more than once: {twice}"
    with psycopg.connect(database_url) as conn:
        (pairs,) = conn.execute(
            "SELECT count(DISTINCT (item_id, variant_id)) FROM experiment_records "
            "WHERE operation_id = %s",
            (operation_id,),
        ).fetchone() or (0,)
    assert pairs == ITEMS * VARIANTS
    assert results["total"] == ITEMS * VARIANTS
    assert {v["variant_id"]: v["n"] for v in results["variants"]} == {
        "control": ITEMS,
        "other": ITEMS,
        "warm": ITEMS,
    }


def test_a_batch_cancelled_on_the_workers_makes_no_call_after_it_stops(
    clean: tuple[str, str],
    processes: Processes,
    upstream: CountingUpstream,
) -> None:
    database_url, redis_url = clean
    env = environment(database_url, redis_url, upstream)
    settings = Settings(**{**env, "PROCESS_ROLE": "api"})  # type: ignore[arg-type]
    with httpx_client(settings) as api:
        prepare(api)
        processes.start(["worker", "--processes", "1", "--threads", "2"], env)
        accepted = post(
            api,
            "/admin/experiments/kill/batches",
            {"dataset_id": "two-hundred", "concurrency": 2},
            202,
        )
        operation_id = accepted["operation_id"]
        wait_until(lambda: batch_state(database_url, operation_id)[1] >= 20, 60, 0.05)

        cancelled = api.delete(f"/v1/operations/{operation_id}", headers=ADMIN)
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        time.sleep(1.0)  # the worker notices at its next checkpoint, calls in flight end
        answered = sum(upstream.answered.values())
        _, records, _ = batch_state(database_url, operation_id)
        time.sleep(1.5)

        status, later, _ = batch_state(database_url, operation_id)
    assert status == "cancelled"
    assert 20 <= records < ITEMS * VARIANTS
    assert later == records, "records were written after the batch was cancelled"
    assert sum(upstream.answered.values()) == answered, "calls were made after the cancel"

"""Every LLM call takes one path (`GatewayCalls`): a direct call, a stream, an async job and a
batch line are refused alike and recorded alike, on both storage backends.

Each test makes the same call in the four contexts, over HTTP as clients do (the jobs run by an
in-process `OperationRunner`, as a worker would), and compares what each context shows: the
error a refused call answers with, and the usage record and execution log a call leaves.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.config import Settings
from app.logs.entities import ExecutionLog
from app.main import create_app
from app.operations.runner import JobTimings, OperationRunner
from app.services import Services, build_handlers
from app.storage.protocol import Storage
from app.usage.entities import UsageRecord
from tests.fakes import RecordingQueue

ADMIN_KEY = "gw-call-path-tests-admin-secret-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
FAST = JobTimings(lease=5, heartbeat=1, retry_base=0.01, retry_max=0.02, resend_after=0.2)

# The mock reports 5 prompt and 7 completion tokens whatever it is sent: at $2 and $10 per
# million tokens every call costs 5 * 2 + 7 * 10 = 80 micro-dollars.
MODEL = {
    "id": "priced-mock",
    "provider": "mock",
    "provider_model": "mock",
    "parameters": {"mock_prompt_tokens": 5, "mock_completion_tokens": 7},
    "input_price_per_million": "2",
    "output_price_per_million": "10",
}
PROMPT_TOKENS, COMPLETION_TOKENS, COST = 5, 7, 80


def chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL["id"], "messages": [{"role": "user", "content": text}], **extra}


@pytest.fixture(autouse=True)
def _no_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env


@dataclass
class Gateway:
    """The app on the storage under test, its admin API, and a worker for the jobs it sends."""

    app: FastAPI
    storage: Storage
    queue: RecordingQueue
    http: httpx.AsyncClient

    @property
    def services(self) -> Services:
        services: Services = self.app.state.services
        return services

    async def admin(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = await self.http.post(path, json=body, headers=ADMIN)
        assert response.status_code == 201, response.text
        created: dict[str, Any] = response.json()
        return created

    async def client_key(self, **body: Any) -> tuple[dict[str, str], str, str]:
        """A key of a new team: the headers presenting it, its id, and the team's id."""
        team = await self.admin("/admin/teams", {"name": "callers"})
        key = await self.admin("/admin/keys", {"name": "client", "team_id": team["id"], **body})
        return {"Authorization": f"Bearer {key['key']}"}, key["id"], team["id"]

    async def run_jobs(self) -> int:
        """Execute the jobs sent so far, as a worker would."""
        runner = OperationRunner(
            self.storage, self.queue, build_handlers(self.services), timings=FAST
        )
        ran = 0
        while self.queue.sent:
            await runner.execute(self.queue.sent.pop(0).operation_id)
            ran += 1
        return ran

    async def operation(self, operation_id: str, key: dict[str, str]) -> dict[str, Any]:
        response = await self.http.get(f"/v1/operations/{operation_id}", headers=key)
        assert response.status_code == 200, response.text
        operation: dict[str, Any] = response.json()
        return operation

    async def file_lines(self, file_id: str | None, key: dict[str, str]) -> list[dict[str, Any]]:
        assert file_id is not None
        response = await self.http.get(f"/v1/files/{file_id}/content", headers=key)
        assert response.status_code == 200, response.text
        return [json.loads(raw) for raw in response.text.splitlines()]

    async def accounting(self) -> tuple[list[UsageRecord], list[ExecutionLog]]:
        """Every usage record and execution log, once the buffered ones are written."""
        async with self.storage.unit_of_work() as uow:
            records = (await uow.repo(UsageRecord).find()).items
            logs = (await uow.repo(ExecutionLog).find()).items
        return records, logs


@pytest.fixture
def overrides() -> dict[str, Any]:
    """Settings a test changes (by parametrizing this fixture indirectly)."""
    return {}


@pytest.fixture
async def gateway(storage: Storage, overrides: dict[str, Any]) -> AsyncIterator[Gateway]:
    queue = RecordingQueue(storage)
    settings = Settings(
        BROKER="stub",
        ADMIN_API_KEY=ADMIN_KEY,
        ADMIN_DEFAULT_PASSWORD="admin-password-for-tests",
        METERING_CACHE_SECONDS=0,
        **overrides,
    )
    app = create_app(settings, storage=storage, queue=queue)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
            gateway_ = Gateway(app, storage, queue, http)
            await gateway_.admin("/admin/models", MODEL)
            yield gateway_


# ---- the four contexts ------------------------------------------------------------------------
#
# Each makes one chat completion and reports how it ended as the direct call would: the HTTP
# status, the body (a completion, or the OpenAI error body), and the job the call ran in.
# `before` runs just before the call is made: for a job, once it is accepted and before it runs.


@dataclass
class Ended:
    status: int | None  # None: a failed job, whose error carries no HTTP status
    body: dict[str, Any]
    operation_id: str | None = None


Before = Callable[[], Awaitable[None]]
Context = Callable[[Gateway, dict[str, str], dict[str, Any], Before], Awaitable[Ended]]


async def nothing() -> None:
    return None


async def direct(
    gateway: Gateway, key: dict[str, str], body: dict[str, Any], before: Before = nothing
) -> Ended:
    await before()
    response = await gateway.http.post("/v1/chat/completions", json=body, headers=key)
    return Ended(response.status_code, response.json())


async def stream(
    gateway: Gateway, key: dict[str, str], body: dict[str, Any], before: Before = nothing
) -> Ended:
    await before()
    streamed = {**body, "stream": True}
    async with gateway.http.stream(
        "POST", "/v1/chat/completions", json=streamed, headers=key
    ) as response:
        raw = (await response.aread()).decode()
    if response.headers["content-type"].startswith("application/json"):
        return Ended(response.status_code, json.loads(raw))
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [e.removeprefix("data: ") for e in raw.split("\n\n") if e]
    assert events[-1] == "[DONE]", raw
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks), raw
    return Ended(response.status_code, {"chunks": chunks})


async def as_job(
    gateway: Gateway, key: dict[str, str], body: dict[str, Any], before: Before = nothing
) -> Ended:
    accepted = await gateway.http.post("/v1/chat/completions?async=true", json=body, headers=key)
    assert accepted.status_code == 202, accepted.text
    operation_id = accepted.json()["operation_id"]
    await before()
    assert await gateway.run_jobs() == 1
    operation = await gateway.operation(operation_id, key)
    assert operation["parent_id"] is None
    if operation["status"] == "completed":
        assert operation["error"] is None
        return Ended(200, operation["result"], operation_id)
    assert operation["status"] == "failed", operation
    assert operation["attempts"] == 1  # a refusal is final: the job is not tried again
    # A job keeps its error's code (as `type`) and message.
    return Ended(None, {"job_error": operation["error"]}, operation_id)


async def batch_line(
    gateway: Gateway, key: dict[str, str], body: dict[str, Any], before: Before = nothing
) -> Ended:
    line = {"custom_id": "only", "method": "POST", "url": "/v1/chat/completions", "body": body}
    uploaded = await gateway.http.post(
        "/v1/files",
        data={"purpose": "batch"},
        files={"file": ("requests.jsonl", (json.dumps(line) + "\n").encode())},
        headers=key,
    )
    assert uploaded.status_code == 200, uploaded.text
    created = await gateway.http.post(
        "/v1/batches",
        json={
            "input_file_id": uploaded.json()["id"],
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        },
        headers=key,
    )
    assert created.status_code == 200, created.text
    await before()
    assert await gateway.run_jobs() == 1
    assert await gateway.services.batches.process_due() == 1
    done = await gateway.http.get(f"/v1/batches/{created.json()['id']}", headers=key)
    batch = done.json()
    assert batch["status"] == "completed", batch
    if batch["request_counts"]["completed"] == 1:
        assert batch["error_file_id"] is None
        (answered,) = await gateway.file_lines(batch["output_file_id"], key)
    else:
        assert batch["request_counts"]["failed"] == 1 and batch["output_file_id"] is None
        (answered,) = await gateway.file_lines(batch["error_file_id"], key)
    assert answered["custom_id"] == "only" and answered["error"] is None
    response = answered["response"]
    child = await gateway.operation(response["request_id"], key)
    assert child["parent_id"] is not None  # the line ran as a child job of the batch
    return Ended(response["status_code"], response["body"], response["request_id"])


CONTEXTS: dict[str, Context] = {
    "direct": direct,
    "stream": stream,
    "async": as_job,
    "batch line": batch_line,
}
JOBS = ("async", "batch line")


# ---- a refusal looks the same from all four ---------------------------------------------------


@pytest.mark.parametrize("used_up", [False, True], ids=["too-small", "used-up"])
async def test_a_budget_refusal_is_the_same_402_from_every_context(
    gateway: Gateway, used_up: bool
) -> None:
    key, _, team_id = await gateway.client_key()
    # One call costs 80: a budget of 50 has no room for it, one of 80 is used up by it.
    budget = await gateway.admin(
        "/admin/budgets",
        {
            "name": "team cap",
            "scope": "team",
            "scope_id": team_id,
            "period": "daily",
            "hard_limit_micros": COST if used_up else 50,
        },
    )
    if used_up:
        spent = await direct(gateway, key, chat("spend it all"))
        assert spent.status == 200, spent.body
        await gateway.services.metering.flush_corrections()  # the counter holds the real cost
    records_before, _ = await gateway.accounting()

    # With `max_tokens` the whole cap must fit: at least 10 * 10 = 100 micro-dollars.
    call_ = chat("hello there", max_tokens=10)
    ended = {name: await call(gateway, key, call_) for name, call in CONTEXTS.items()}

    refused = ended["direct"]
    assert refused.status == 402
    error = refused.body["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "insufficient_quota",
        "budget_exceeded",
        None,
    )
    assert "budget 'team cap' (team, daily)" in error["message"]
    if used_up:
        assert f"is used up: {COST} of {COST} micro-dollars spent" in error["message"]
    else:
        assert "has no room for this request: 0 of 50 micro-dollars used" in error["message"]
    assert ended["stream"].status == 402 and ended["stream"].body == refused.body
    assert ended["async"].status is None
    assert ended["async"].body == {
        "job_error": {"type": error["code"], "message": error["message"]}
    }
    assert ended["batch line"].status == 402 and ended["batch line"].body == refused.body
    assert all(ended[name].operation_id for name in JOBS)

    # Refused before any upstream call: nothing is recorded, nothing is charged.
    records, _ = await gateway.accounting()
    assert len(records) == len(records_before) == (1 if used_up else 0)
    await gateway.services.metering.flush_corrections()
    read = (await gateway.http.get(f"/admin/budgets/{budget['id']}", headers=ADMIN)).json()
    assert read["current_usage_micros"] == (COST if used_up else 0)


# ---- a call is recorded the same from all four ------------------------------------------------


# Times differ from call to call: each is checked to be there, not compared.
_TIMES = {"latency_ms", "execution_time_ms", "overhead_ms"}


def _record_fields(record: UsageRecord) -> dict[str, Any]:
    assert record.overhead_ms is not None and record.overhead_ms >= 0
    return record.model_dump(exclude={"id", "created_at", "updated_at", "version", *_TIMES})


def _log_fields(entry: ExecutionLog) -> dict[str, Any]:
    assert entry.overhead_ms is not None and entry.overhead_ms >= 0
    return entry.model_dump(exclude={"id", "created_at", "updated_at", "version", *_TIMES})


@pytest.mark.parametrize(
    "overrides", [{}, {"LOG_REQUEST_BODIES": True}], ids=["metadata-only", "bodies-logged"]
)
async def test_a_call_leaves_the_same_usage_record_and_log_from_every_context(
    gateway: Gateway, overrides: dict[str, Any]
) -> None:
    key, key_id, team_id = await gateway.client_key()
    records: dict[str, dict[str, Any]] = {}
    logs: dict[str, dict[str, Any]] = {}
    jobs: dict[str, str | None] = {}
    sent: dict[str, dict[str, Any]] = {}
    answered: dict[str, dict[str, Any]] = {}
    seen: set[str] = set()
    for name, call in CONTEXTS.items():
        # A text of its own per context: no answer is another's (were a cache on).
        sent[name] = chat(f"a question asked {name}")
        ended = await call(gateway, key, sent[name])
        assert ended.status == 200, ended.body
        jobs[name], answered[name] = ended.operation_id, ended.body
        all_records, all_logs = await gateway.accounting()
        (record,) = [r for r in all_records if r.id not in seen]
        (entry,) = [e for e in all_logs if e.id not in seen]
        seen |= {record.id, entry.id}
        records[name], logs[name] = _record_fields(record), _log_fields(entry)

    assert jobs["direct"] is None and jobs["stream"] is None
    assert jobs["async"] and jobs["batch line"] and jobs["async"] != jobs["batch line"]
    assert records["direct"] == {
        "usage_type": "chat_completion",
        "api_key_id": key_id,
        "team_id": team_id,
        "model_id": MODEL["id"],
        "provider": "mock",
        "input_tokens": PROMPT_TOKENS,
        "output_tokens": COMPLETION_TOKENS,
        "cost_micros": COST,
        "status": "success",
        "cache_hit": False,
        "operation_id": None,
        "error": None,
    }
    bodies = bool(overrides)
    assert logs["direct"] == {
        "execution_type": "chat_completion",
        "resource_id": MODEL["id"],
        "resource_name": MODEL["id"],
        "status": "success",
        # Bodies are logged only when the configuration says so.
        "input": sent["direct"] if bodies else None,
        "output": answered["direct"] if bodies else None,
        "error": None,
        "cost_micros": COST,
        "input_tokens": PROMPT_TOKENS,
        "output_tokens": COMPLETION_TOKENS,
        "provider": "mock",
        "cache_hit": False,
        "api_key_id": key_id,
        "user_id": None,
        "team_id": team_id,
        "operation_id": None,
        "is_async": False,
        "workflow_steps": [],
    }
    # The context shows only in the job the call ran in, and whether it ran as one; the log
    # keeps each call's own request and the answer its client got (a stream's, never held
    # whole, is not kept).
    for name in CONTEXTS:
        assert records[name] == {**records["direct"], "operation_id": jobs[name]}, name
        request = {**sent[name], "stream": True} if name == "stream" else sent[name]
        assert logs[name] == {
            **logs["direct"],
            "operation_id": jobs[name],
            "is_async": name in JOBS,
            "input": request if bodies else None,
            "output": answered[name] if bodies and name != "stream" else None,
        }, name


# ---- a permission refusal looks the same from all four ----------------------------------------


async def test_a_permission_refusal_is_the_same_403_from_every_context_when_the_call_runs(
    gateway: Gateway,
) -> None:
    """Jobs are accepted while the key may use the model and refused when they run, after the
    key lost it (tests/access/test_permissions.py checks the handler; this, what clients see)."""

    async def refused_in(call: Context) -> Ended:
        key, key_id, _ = await gateway.client_key(permissions={"models": [MODEL["id"]]})

        async def forbid_the_model() -> None:
            changed = await gateway.http.patch(
                f"/admin/keys/{key_id}", json={"permissions": {"models": ["mock"]}}, headers=ADMIN
            )
            assert changed.status_code == 200, changed.text

        return await call(gateway, key, chat("hello there"), forbid_the_model)

    ended = {name: await refused_in(call) for name, call in CONTEXTS.items()}

    refused = ended["direct"]
    assert refused.status == 403
    error = refused.body["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "permission_error",
        "permission_denied",
        "model",
    )
    assert MODEL["id"] in error["message"]
    assert ended["stream"].status == 403 and ended["stream"].body == refused.body
    assert ended["async"].status is None
    assert ended["async"].body == {
        "job_error": {"type": error["code"], "message": error["message"]}
    }
    line = ended["batch line"]
    assert line.status == 403
    # A failed job keeps its error's code and message, not the field it named.
    assert line.body == {"error": {**error, "param": None}}
    records, logs = await gateway.accounting()
    assert records == [] and logs == []

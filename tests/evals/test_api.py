"""Test cases, suites and runs through the admin API, the runs executed as a worker would,
on memory storage and on PostgreSQL."""

from __future__ import annotations

import asyncio
import csv
import io
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
import orjson
import pytest
from fastapi import FastAPI

from app.core.clock import utcnow
from app.evals.entities import TestCaseResult
from app.gateway.calls import DIRECT, CallContext, Caller, CallSource, Completion
from app.gateway.schemas import ChatCompletionRequest
from app.main import create_app
from app.operations.entities import Operation, OperationStatus
from app.operations.runner import JobTimings, OperationRunner
from app.services import Services, build_handlers
from app.storage.protocol import Storage, Where
from app.usage.entities import UsageRecord
from app.webhooks.entities import WebhookDelivery
from tests.fakes import RecordingQueue
from tests.gateway.conftest import ADMIN, gateway_settings

FAST = JobTimings(lease=5, heartbeat=1, retry_base=0.01, retry_max=0.02, resend_after=0.2)
JUDGE_PASS = '{"reason": "it greets", "pass": true, "score": 0.9}'


@dataclass
class Gateway:
    app: FastAPI
    storage: Storage
    queue: RecordingQueue
    http: httpx.AsyncClient

    @property
    def services(self) -> Services:
        services: Services = self.app.state.services
        return services

    def runner(self) -> OperationRunner:
        return OperationRunner(
            self.storage, self.queue, build_handlers(self.services), timings=FAST
        )

    async def run_jobs(self, slots: int = 1) -> int:
        """Execute the jobs sent so far, and those they send, as a worker with `slots` threads
        would: up to that many at once."""
        runner = self.runner()
        ran = 0
        running: set[asyncio.Future[bool]] = set()
        while self.queue.sent or running:
            while self.queue.sent and len(running) < slots:
                sent = self.queue.sent.pop(0)
                running.add(asyncio.ensure_future(runner.execute(sent.operation_id)))
                ran += 1
            done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        return ran

    async def usage(self) -> list[UsageRecord]:
        async with self.storage.unit_of_work() as uow:
            return (await uow.repo(UsageRecord).find()).items

    async def operation(self, operation_id: str) -> Operation:
        async with self.storage.unit_of_work() as uow:
            found = await uow.repo(Operation).get(operation_id)
        assert found is not None
        return found

    async def post(self, path: str, body: Any = None, status: int = 200) -> Any:
        response = await self.http.post(path, json=body)
        assert response.status_code == status, response.text
        return response.json()

    async def get(self, path: str, status: int = 200) -> Any:
        response = await self.http.get(path)
        assert response.status_code == status, response.text
        return response.json()

    async def model(self, model_id: str, **parameters: Any) -> None:
        body = {"id": model_id, "provider": "mock", "provider_model": "mock"}
        await self.post("/admin/models", {**body, "parameters": parameters}, 201)

    async def case(
        self, case_id: str, message: str, *assertions: dict[str, Any], **extra: Any
    ) -> Any:
        body = {
            "id": case_id,
            "input": {"user_message": message},
            "assertions": list(assertions),
            **extra,
        }
        return await self.post("/admin/test-cases", body, 201)


@pytest.fixture
async def gateway(storage: Storage) -> AsyncIterator[Gateway]:
    queue = RecordingQueue(storage)
    app = create_app(gateway_settings(), storage=storage, queue=queue)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport,
            base_url="http://gateway",
            headers={"Authorization": f"Bearer {ADMIN}"},
        ) as http:
            yield Gateway(app, storage, queue, http)


def contains(value: str) -> dict[str, Any]:
    return {"type": "contains", "value": value}


MOCK = {"type": "model", "model": "mock"}


@dataclass
class CallLog:
    """Every chat call the gateway made, with its context; `before` runs before each, `after`
    once it answered."""

    calls: list[tuple[ChatCompletionRequest, CallContext]]
    before: Callable[[ChatCompletionRequest], Awaitable[None]] | None = None
    after: Callable[[ChatCompletionRequest], Awaitable[None]] | None = None

    def texts(self) -> Counter[str]:
        return Counter(str(r.messages[-1].content) for r, _ in self.calls)


def record_calls(gateway: Gateway) -> CallLog:
    calls = gateway.services.calls
    original = calls.complete
    log = CallLog([])

    async def complete(
        caller: Caller, request: ChatCompletionRequest, context: CallContext = DIRECT
    ) -> Completion:
        log.calls.append((request, context))
        if log.before is not None:
            await log.before(request)
        answered = await original(caller, request, context)
        if log.after is not None:
            await log.after(request)
        return answered

    calls.complete = complete  # type: ignore[method-assign]
    return log


# ---- saving ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (
            {"assertions": [contains("x"), {"type": "regex", "value": "(unclosed"}]},
            400,
            "assertions.1.value",
        ),
        ({"assertions": [{"type": "javascript", "value": "1"}]}, 400, "assertions.0.type"),
        ({"assertions": [{"type": "is-json", "value": {"type": 7}}]}, 400, "assertions.0.value"),
        ({"assertions": [{"type": "latency"}]}, 400, "assertions.0.threshold"),
        (
            {"assertions": [{"type": "llm-rubric", "value": "x", "provider": "nope"}]},
            404,
            "assertions.0.provider",
        ),
        (
            {"assertions": [{"type": "similar", "value": "x", "provider": "mock"}]},
            400,
            "assertions.0.provider",
        ),
        ({"target": {"type": "model", "model": "no-such-model"}}, 404, "target.model"),
        ({"target": {"type": "model", "model": "mock-embedding"}}, 400, "target.model"),
        ({"target": {"type": "chain", "chain": "mock"}}, 400, "target.chain"),
        (
            {"target": {"type": "prompt", "prompt_id": "nope", "model": "mock"}},
            404,
            "target.prompt_id",
        ),
        ({"target": {"type": "workflow", "workflow_id": "w"}}, 404, "target.workflow_id"),
        ({"target": {"type": "spaceship"}}, 400, "target"),
        ({"id": "Not A Slug"}, 400, "id"),
    ],
)
async def test_a_test_case_that_could_not_run_is_refused_naming_the_field(
    gateway: Gateway, body: dict[str, Any], status: int, param: str
) -> None:
    response = await gateway.http.post(
        "/admin/test-cases",
        json={"id": "c1", "input": {"user_message": "hi"}, "target": MOCK, **body},
    )
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param


async def test_a_test_case_is_created_read_changed_listed_and_deleted(gateway: Gateway) -> None:
    created = await gateway.case(
        "greets", "Say hi", contains("hi"), target=MOCK, tags=["smoke"], threshold=0.5
    )
    assert created["test_type"] == "model_prompt" and created["target"] == MOCK
    assert created["assertions"] == [contains("hi")] and created["threshold"] == 0.5
    duplicate = await gateway.http.post(
        "/admin/test-cases", json={"id": "greets", "input": {"user_message": "x"}}
    )
    assert duplicate.status_code == 409

    changed = (
        await gateway.http.patch(
            "/admin/test-cases/greets",
            json={
                "assertions": [{"type": "icontains", "value": "HI", "weight": 2}],
                "target": None,
            },
        )
    ).json()
    assert changed["assertions"] == [{"type": "icontains", "value": "HI", "weight": 2.0}]
    assert changed["target"] is None and changed["name"] == "greets"
    refused = await gateway.http.patch(
        "/admin/test-cases/greets", json={"assertions": [{"type": "regex", "value": "["}]}
    )
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "assertions.0.value"

    listed = await gateway.get("/admin/test-cases?test_type=model_prompt")
    assert [c["id"] for c in listed["data"]] == ["greets"]
    deleted = await gateway.http.delete("/admin/test-cases/greets")
    assert deleted.json() == {"id": "greets", "object": "test_case", "deleted": True}
    await gateway.get("/admin/test-cases/greets", status=404)


async def test_a_suite_names_existing_cases_and_checks_its_defaults(gateway: Gateway) -> None:
    await gateway.case("a", "one")
    await gateway.case("b", "two")
    missing = await gateway.http.post(
        "/admin/test-suites", json={"id": "s", "case_ids": ["a", "zzz"]}
    )
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "case_ids.1"
    twice = await gateway.http.post("/admin/test-suites", json={"id": "s", "case_ids": ["a", "a"]})
    assert twice.status_code == 400 and twice.json()["error"]["param"] == "case_ids.1"
    judge = await gateway.http.post(
        "/admin/test-suites", json={"id": "s", "case_ids": ["a"], "judge_model": "nope"}
    )
    assert judge.status_code == 404 and judge.json()["error"]["param"] == "judge_model"

    suite = await gateway.post(
        "/admin/test-suites",
        {"id": "s", "case_ids": ["b", "a"], "default_target": MOCK, "pass_threshold": 0.5},
        201,
    )
    assert suite["case_ids"] == ["b", "a"] and suite["concurrency"] == 4
    changed = (await gateway.http.patch("/admin/test-suites/s", json={"case_ids": ["a"]})).json()
    assert changed["case_ids"] == ["a"] and changed["default_target"] == MOCK
    await gateway.http.delete("/admin/test-cases/a")
    assert (await gateway.get("/admin/test-suites/s"))["case_ids"] == []
    assert [s["id"] for s in (await gateway.get("/admin/test-suites"))["data"]] == ["s"]


# ---- running -----------------------------------------------------------------------------------


async def suite_of(gateway: Gateway, *case_ids: str, **extra: Any) -> None:
    body = {"id": "suite", "case_ids": list(case_ids), "default_target": MOCK, **extra}
    await gateway.post("/admin/test-suites", body, 201)


async def test_a_suite_run_is_a_job_whose_results_keep_output_verdicts_latency_and_tokens(
    gateway: Gateway,
) -> None:
    log = record_calls(gateway)
    hook = {"url": "http://127.0.0.1:9/hooks", "events": ["suite_run.*"]}
    await gateway.post("/admin/webhooks", hook, 201)
    await gateway.case("hello", "hello", contains("hello"), {"type": "latency", "threshold": 60000})
    await gateway.case("bye", "bye", {"type": "equals", "value": "nope"})
    await suite_of(gateway, "hello", "bye", pass_threshold=0.5)

    accepted = await gateway.post("/admin/test-suites/suite/runs", None, 202)
    assert accepted["status"] == "pending" and accepted["operation_id"].startswith("op-")
    pending = await gateway.get(f"/admin/test-suites/suite/runs/{accepted['id']}")
    assert pending["status"] == "pending" and pending["passed"] is None
    assert pending["progress"] == {"total": 2, "done": 0, "passed": 0, "failed": 0, "errored": 0}

    await gateway.run_jobs()  # the run, then the event's delivery attempts
    run = await gateway.get(f"/admin/test-suites/suite/runs/{accepted['id']}")
    assert run["status"] == "completed"
    assert run["progress"] == {"total": 2, "done": 2, "passed": 1, "failed": 1, "errored": 0}
    assert run["passed"] is True and run["pass_rate"] == 0.5 and run["score"] == 0.5
    operation = await gateway.get(f"/v1/operations/{accepted['operation_id']}")
    assert operation["status"] == "completed" and operation["result"]["passed"] is True
    async with gateway.storage.unit_of_work() as uow:
        events = await uow.repo(WebhookDelivery).find(Where.eq("event_type", "suite_run.completed"))
    (event,) = events.items
    data = event.payload["data"]
    assert data["run_id"] == accepted["id"] and data["suite_id"] == "suite"
    assert data["passed"] is True and data["progress"]["done"] == 2

    results = await gateway.get(f"/admin/test-runs/{accepted['id']}/results")
    by_case = {r["test_case_id"]: r for r in results["data"]}
    hello = by_case["hello"]
    assert hello["outcome"] == "passed" and hello["output"] == "Mock reply to: hello"
    assert hello["model"] == "mock" and hello["tokens_used"] and hello["cost_usd"] == 0
    assert [v["type"] for v in hello["assertion_results"]] == ["contains", "latency"]
    assert all(v["passed"] and v["reason"] for v in hello["assertion_results"])
    assert by_case["bye"]["outcome"] == "failed" and by_case["bye"]["score"] == 0.0
    failed = await gateway.get(f"/admin/test-runs/{accepted['id']}/results?outcome=failed")
    assert [r["test_case_id"] for r in failed["data"]] == ["bye"]

    # Every target call went through the gateway as the run's evaluation calls, each case's
    # in a job of its own, a child of the run's.
    assert len(log.calls) == 2
    assert {c.source for _, c in log.calls} == {CallSource.EVALUATION}
    children = await gateway.get(f"/v1/operations?parent_id={accepted['operation_id']}")
    assert {c.operation_id for _, c in log.calls} == {c["id"] for c in children["data"]}
    assert operation["children"] == {"total": 2, "completed": 2, "failed": 0, "cancelled": 0}
    assert operation["progress"] == {"completed": 2, "total": 2, "passed": 1, "failed": 1}
    usage = await gateway.usage()
    assert sorted(u.operation_id or "" for u in usage) == sorted(
        c["id"] for c in children["data"]
    )  # one record per call, with its case's job
    exported = await gateway.get(f"/admin/test-runs/{accepted['id']}/export")
    assert exported["run"]["passed"] is True
    assert [(r["name"], r["outcome"]) for r in exported["results"]] == [
        ("hello", "passed"), ("bye", "failed"),
    ]  # fmt: skip
    table = await gateway.http.get(f"/admin/test-runs/{accepted['id']}/export?format=csv")
    assert table.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(table.text)))
    assert [(r["test_case_id"], r["outcome"], r["failed_assertions"]) for r in rows] == [
        ("hello", "passed", ""), ("bye", "failed", "equals"),
    ]  # fmt: skip
    history = await gateway.get("/admin/test-cases/hello/results")
    assert [r["run_id"] for r in history["data"]] == [accepted["id"]]


async def test_a_run_below_the_pass_threshold_does_not_pass_the_gate(gateway: Gateway) -> None:
    await gateway.case("hello", "hello", contains("hello"))
    await gateway.case("bye", "bye", contains("hello"))
    await suite_of(gateway, "hello", "bye", pass_threshold=0.75)
    run_id = (await gateway.post("/admin/test-suites/suite/runs", None, 202))["id"]
    await gateway.run_jobs()
    run = await gateway.get(f"/admin/test-runs/{run_id}")
    assert run["passed"] is False and run["pass_rate"] == 0.5


async def test_a_case_threshold_passes_a_case_on_its_weighted_score(gateway: Gateway) -> None:
    await gateway.case(
        "mostly",
        "hello",
        {"type": "contains", "value": "hello", "weight": 3},
        contains("absent"),
    )
    await suite_of(gateway, "mostly", case_threshold=0.7)
    run_id = (await gateway.post("/admin/test-suites/suite/runs", None, 202))["id"]
    await gateway.run_jobs()
    (result,) = (await gateway.get(f"/admin/test-runs/{run_id}/results"))["data"]
    assert result["outcome"] == "passed" and result["score"] == 0.75


async def test_model_graded_assertions_call_the_judge_and_a_bad_answer_errs_the_case(
    gateway: Gateway,
) -> None:
    await gateway.model("judge", mock_reply=JUDGE_PASS)
    await gateway.model("babbler", mock_reply="I'd say it passes, more or less.")
    rubric = {"type": "llm-rubric", "value": "greets the user"}
    await gateway.case("judged", "hello", rubric)
    await gateway.case("badly-judged", "hello", {**rubric, "provider": "babbler"})
    await gateway.case("similar", "hello", {"type": "similar", "value": "Mock reply to: hello"})
    await suite_of(
        gateway,
        "judged",
        "badly-judged",
        "similar",
        judge_model="judge",
        embedding_model="mock-embedding",
    )
    log = record_calls(gateway)
    run_id = (await gateway.post("/admin/test-suites/suite/runs", None, 202))["id"]
    await gateway.run_jobs()

    results = (await gateway.get(f"/admin/test-runs/{run_id}/results"))["data"]
    by_case = {r["test_case_id"]: r for r in results}
    judged = by_case["judged"]["assertion_results"][0]
    assert by_case["judged"]["outcome"] == "passed"
    assert (judged["score"], judged["reason"]) == (0.9, "it greets")
    bad = by_case["badly-judged"]
    assert bad["outcome"] == "errored" and "judge" in bad["assertion_results"][0]["error"]
    assert by_case["similar"]["outcome"] == "passed"
    judges = [r.model for r, c in log.calls if r.model in ("judge", "babbler")]
    assert sorted(judges) == ["babbler", "judge"]
    assert {c.source for _, c in log.calls} == {CallSource.EVALUATION}


async def test_a_run_needing_a_judge_without_one_is_refused_when_started(gateway: Gateway) -> None:
    await gateway.case("judged", "hello", {"type": "llm-rubric", "value": "greets"})
    await suite_of(gateway, "judged")
    response = await gateway.http.post("/admin/test-suites/suite/runs")
    assert response.status_code == 400 and response.json()["error"]["param"] == "judge_model"


async def test_a_case_without_any_target_is_refused_when_the_run_starts(gateway: Gateway) -> None:
    await gateway.case("loose", "hello")
    await gateway.post("/admin/test-suites", {"id": "suite", "case_ids": ["loose"]}, 201)
    response = await gateway.http.post("/admin/test-suites/suite/runs")
    assert response.status_code == 400 and response.json()["error"]["param"] == "target"
    given = await gateway.http.post("/admin/test-suites/suite/runs", json={"target": MOCK})
    assert given.status_code == 202


async def test_a_workflow_case_runs_the_workflow_and_grades_its_output(gateway: Gateway) -> None:
    step = {
        "name": "answer",
        "type": "chat_completion",
        "model_id": "mock",
        "user_message": "${request:question}",
    }
    await gateway.post("/admin/workflows", {"id": "flow", "name": "a flow", "steps": [step]}, 201)
    await gateway.post(
        "/admin/test-cases",
        {
            "id": "flow-case",
            "input": {"type": "workflow", "input": {"question": "hello"}},
            "target": {"type": "workflow", "workflow_id": "flow"},
            "assertions": [contains("Mock reply to: hello")],
        },
        201,
    )
    accepted = await gateway.post("/admin/test-cases/flow-case/runs", None, 202)
    await gateway.run_jobs()
    run = await gateway.get(f"/admin/test-runs/{accepted['id']}")
    assert run["status"] == "completed" and run["passed"] is True
    (result,) = (await gateway.get("/admin/test-cases/flow-case/results"))["data"]
    # A workflow's output is its last step's: a chat step gives its content with the model.
    assert result["outcome"] == "passed" and "Mock reply to: hello" in result["output"]


async def test_a_single_case_runs_with_a_target_given_for_the_run(gateway: Gateway) -> None:
    await gateway.case("alone", "hello", contains("hello"))
    refused = await gateway.http.post("/admin/test-cases/alone/runs")
    assert refused.status_code == 400
    accepted = await gateway.post("/admin/test-cases/alone/runs", {"target": MOCK}, 202)
    await gateway.run_jobs()
    run = await gateway.get(f"/admin/test-runs/{accepted['id']}")
    assert run["test_case_id"] == "alone" and run["suite_id"] is None and run["passed"] is True
    runs = await gateway.get("/admin/test-cases/alone/runs")
    assert [r["id"] for r in runs["data"]] == [accepted["id"]]
    await gateway.http.patch("/admin/test-cases/alone", json={"enabled": False})
    disabled = await gateway.http.post("/admin/test-cases/alone/runs", json={"target": MOCK})
    assert disabled.status_code == 400


async def test_comparing_two_runs_lists_the_regressions_and_improvements(
    gateway: Gateway,
) -> None:
    prompt = {"id": "greeter", "content": "Greet ${var:name} warmly"}
    await gateway.post("/admin/prompts", prompt, 201)
    target = {"type": "prompt", "prompt_id": "greeter", "model": "mock"}
    for name in ("ada", "bob", "cy"):
        body = {
            "id": f"greet-{name}",
            "input": {"variables": {"name": name}},
            "assertions": [contains("warmly")],
        }
        await gateway.post("/admin/test-cases", body, 201)
    await gateway.case("stable", "hello", contains("hello"), target=MOCK)
    await gateway.post(
        "/admin/test-suites",
        {
            "id": "suite",
            "case_ids": ["greet-ada", "greet-bob", "greet-cy", "stable"],
            "default_target": target,
        },
        201,
    )
    first = (await gateway.post("/admin/test-suites/suite/runs", None, 202))["id"]
    await gateway.run_jobs()
    # One changed prompt version: the greeting is no longer warm.
    await gateway.http.patch("/admin/prompts/greeter", json={"content": "Greet ${var:name}"})
    second = (await gateway.post("/admin/test-suites/suite/runs", None, 202))["id"]
    await gateway.run_jobs()

    compared = await gateway.get(f"/admin/test-suites/suite/runs/{second}/compare?baseline={first}")
    assert sorted(c["test_case_id"] for c in compared["regressions"]) == [
        "greet-ada", "greet-bob", "greet-cy",
    ]  # fmt: skip
    assert compared["improvements"] == [] and compared["unchanged"] == 1
    assert compared["regressions"][0]["baseline"]["outcome"] == "passed"
    assert compared["regressions"][0]["current"]["outcome"] == "failed"
    back = await gateway.get(f"/admin/test-runs/{first}/compare?baseline={second}")
    assert len(back["improvements"]) == 3 and back["regressions"] == []

    # Only the cases that did not pass run again, against the old version.
    pinned = {**target, "version": 1}
    again = await gateway.post(
        "/admin/test-suites/suite/runs", {"failed_from": second, "target": pinned}, 202
    )
    await gateway.run_jobs()
    run = await gateway.get(f"/admin/test-runs/{again['id']}")
    assert run["progress"]["total"] == 3 and run["passed"] is True
    listed = await gateway.get("/admin/test-suites/suite/runs")
    assert [r["id"] for r in listed["data"]] == [again["id"], second, first]
    other = await gateway.http.get(f"/admin/test-suites/other/runs/{first}")
    assert other.status_code == 404


async def test_a_cancelled_run_stops_and_keeps_what_it_had_done(gateway: Gateway) -> None:
    await gateway.case("a", "one", contains("one"))
    await suite_of(gateway, "a")
    accepted = await gateway.post("/admin/test-suites/suite/runs", None, 202)
    cancelled = await gateway.post(f"/admin/test-suites/suite/runs/{accepted['id']}/cancel")
    assert cancelled["status"] == "cancelled" and cancelled["passed"] is None
    log = record_calls(gateway)
    await gateway.run_jobs()
    assert log.calls == []
    operation = await gateway.get(f"/v1/operations/{accepted['operation_id']}")
    assert operation["status"] == "cancelled"
    again = await gateway.http.post(f"/admin/test-runs/{accepted['id']}/cancel")
    assert again.status_code == 200 and again.json()["status"] == "cancelled"


async def test_a_run_cancelled_mid_way_starts_no_further_case(gateway: Gateway) -> None:
    for i in range(6):
        await gateway.case(f"c{i}", f"case {i}", contains("case"))
    await suite_of(gateway, *[f"c{i}" for i in range(6)], concurrency=1)
    accepted = await gateway.post("/admin/test-suites/suite/runs", None, 202)
    log = record_calls(gateway)

    async def cancel_at_the_third(request: ChatCompletionRequest) -> None:
        if len(log.calls) == 3:
            await gateway.services.evals.cancel_run(accepted["id"])
            # A checkpoint trusts a hold seen this recently (`JobTimings.checkpoint_fresh`).
            await asyncio.sleep(FAST.checkpoint_fresh * 1.5)

    log.before = cancel_at_the_third
    await gateway.run_jobs()
    run = await gateway.get(f"/admin/test-runs/{accepted['id']}")
    assert run["status"] == "cancelled"
    assert len(log.calls) == 3 and run["progress"]["done"] <= 3


async def test_cancelling_a_run_with_cases_in_flight_calls_nothing_more_and_keeps_theirs(
    gateway: Gateway,
) -> None:
    for i in range(8):
        await gateway.case(f"c{i}", f"case {i}", contains("case"))
    await suite_of(gateway, *[f"c{i}" for i in range(8)], concurrency=3)
    accepted = await gateway.post("/admin/test-suites/suite/runs", None, 202)
    assert len(gateway.queue.sent) == 3  # the window: the other cases' jobs are held
    log = record_calls(gateway)
    three_in_flight, cancelled = asyncio.Event(), asyncio.Event()

    async def hold_until_cancelled(request: ChatCompletionRequest) -> None:
        if len(log.calls) == 3:
            three_in_flight.set()
        await cancelled.wait()

    async def cancel_then_release() -> None:
        await three_in_flight.wait()
        await gateway.services.evals.cancel_run(accepted["id"])
        cancelled.set()

    log.before = hold_until_cancelled
    canceller = asyncio.ensure_future(cancel_then_release())
    await gateway.run_jobs(slots=8)
    await canceller

    run = await gateway.get(f"/admin/test-runs/{accepted['id']}")
    assert run["status"] == "cancelled" and run["passed"] is None
    # No case was called after the cancel; the three under way had made their calls, and
    # each keeps its result with its one usage record.
    assert len(log.calls) == 3
    results = (await gateway.get(f"/admin/test-runs/{accepted['id']}/results"))["data"]
    assert run["progress"]["done"] == len(results) == 3
    assert sorted(u.operation_id or "" for u in await gateway.usage()) == sorted(
        r["operation_id"] for r in results
    )
    parent = await gateway.get(f"/v1/operations/{accepted['operation_id']}")
    assert parent["status"] == "cancelled"
    assert parent["children"] == {"total": 8, "completed": 0, "failed": 0, "cancelled": 8}
    children = await gateway.get(f"/v1/operations?parent_id={accepted['operation_id']}")
    assert {c["status"] for c in children["data"]} == {"cancelled"}
    assert not gateway.queue.sent  # nothing held was sent


async def test_a_case_whose_worker_died_runs_again_and_no_finished_case_does(
    gateway: Gateway,
) -> None:
    for i in range(6):
        await gateway.case(f"c{i}", f"case {i}", contains("case"))
    await suite_of(gateway, *[f"c{i}" for i in range(6)], concurrency=1)
    accepted = await gateway.post("/admin/test-suites/suite/runs", None, 202)
    log = record_calls(gateway)
    worker: asyncio.Future[bool] | None = None

    async def die_once_the_third_answered(request: ChatCompletionRequest) -> None:
        if len(log.calls) == 3 and worker is not None:
            worker.cancel()  # the worker process is gone: the call made, nothing committed
            await asyncio.sleep(10)

    log.after = die_once_the_third_answered
    runner = gateway.runner()
    with pytest.raises(asyncio.CancelledError):
        while gateway.queue.sent:
            worker = asyncio.ensure_future(runner.execute(gateway.queue.sent.pop(0).operation_id))
            await worker
    log.after = None
    async with gateway.storage.unit_of_work() as uow:
        kept = await uow.repo(TestCaseResult).count(Where.eq("run_id", accepted["id"]))
        (third,) = (
            await uow.repo(Operation).find(
                Where.eq("parent_id", accepted["operation_id"]), Where.eq("status", "running")
            )
        ).items
        # Its lease runs out, as a dead worker's does.
        await uow.repo(Operation).write_where(
            third.id, {"lease_expires_at": utcnow() - timedelta(seconds=1)}
        )
        await uow.commit()
    assert kept == 2 and third.parent_id == accepted["operation_id"]
    assert len(await gateway.usage()) == 2  # the killed attempt's call is not charged
    report = await runner.sweep()
    assert report.recovered == 1
    await gateway.run_jobs()

    run = await gateway.get(f"/admin/test-runs/{accepted['id']}")
    assert run["status"] == "completed" and run["progress"]["done"] == 6
    calls = log.texts()
    assert [calls[f"case {i}"] for i in range(6)] == [1, 1, 2, 1, 1, 1]
    async with gateway.storage.unit_of_work() as uow:
        rows = await uow.repo(TestCaseResult).find(Where.eq("run_id", accepted["id"]))
    assert sorted(r.test_case_id for r in rows.items) == [f"c{i}" for i in range(6)]
    # One usage record per kept result: the case that ran twice is charged once.
    assert sorted(u.operation_id or "" for u in await gateway.usage()) == sorted(
        r.operation_id or "" for r in rows.items
    )
    again = await gateway.operation(third.id)
    assert again.status == OperationStatus.COMPLETED and again.attempts == 2
    assert [e["outcome"] for e in again.attempt_log] == ["lost", "completed"]
    parent = await gateway.operation(accepted["operation_id"])
    assert parent.status == OperationStatus.COMPLETED and parent.attempts == 1
    assert parent.result["progress"]["passed"] == 6  # the summary is the run's job's result
    assert orjson.dumps(parent.result)


async def test_a_close_whose_worker_died_after_writing_the_run_announces_it_once(
    gateway: Gateway,
) -> None:
    hook = {"url": "http://127.0.0.1:9/hooks", "events": ["suite_run.completed"]}
    await gateway.post("/admin/webhooks", hook, 201)
    for i in range(3):
        await gateway.case(f"c{i}", f"case {i}", contains("case"))
    await suite_of(gateway, "c0", "c1", "c2", concurrency=2)
    accepted = await gateway.post("/admin/test-suites/suite/runs", None, 202)
    parent_id = accepted["operation_id"]
    runner = gateway.runner()
    while gateway.queue.sent and gateway.queue.sent[0].operation_id != parent_id:
        await runner.execute(gateway.queue.sent.pop(0).operation_id)
    assert [s.operation_id for s in gateway.queue.sent] == [parent_id]  # the close, sent

    async def die(*args: Any) -> bool:
        raise asyncio.CancelledError  # the worker is gone before the close's outcome

    dying = gateway.runner()
    dying._complete = die  # type: ignore[method-assign]
    with pytest.raises(asyncio.CancelledError):
        await dying.execute(gateway.queue.sent.pop(0).operation_id)
    closed = await gateway.get(f"/admin/test-runs/{accepted['id']}")
    assert closed["status"] == "completed"  # the close had committed the run
    async with gateway.storage.unit_of_work() as uow:
        await uow.repo(Operation).write_where(
            parent_id, {"lease_expires_at": utcnow() - timedelta(seconds=1)}
        )
        await uow.commit()
    assert (await runner.sweep()).recovered == 1
    await gateway.run_jobs()

    parent = await gateway.operation(parent_id)
    assert parent.status == OperationStatus.COMPLETED and parent.attempts == 2
    assert parent.result["run_id"] == accepted["id"] and parent.result["passed"] is True
    assert parent.result["progress"]["done"] == 3
    async with gateway.storage.unit_of_work() as uow:
        events = await uow.repo(WebhookDelivery).find(Where.eq("event_type", "suite_run.completed"))
    assert len(events.items) == 1


async def test_a_runs_cases_are_at_most_its_concurrency_at_once_however_many_threads(
    gateway: Gateway,
) -> None:
    for i in range(9):
        await gateway.case(f"c{i}", f"case {i}", contains("case"))
    await suite_of(gateway, *[f"c{i}" for i in range(9)], concurrency=2)
    accepted = await gateway.post("/admin/test-suites/suite/runs", None, 202)
    log = record_calls(gateway)
    in_flight, most = 0, 0

    async def enter(request: ChatCompletionRequest) -> None:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.01)

    async def leave(request: ChatCompletionRequest) -> None:
        nonlocal in_flight
        in_flight -= 1

    log.before, log.after = enter, leave
    await gateway.run_jobs(slots=8)
    run = await gateway.get(f"/admin/test-runs/{accepted['id']}")
    assert run["status"] == "completed" and run["progress"]["passed"] == 9
    assert most == 2 and len(log.calls) == 9

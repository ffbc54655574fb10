"""Running workflows: every step type, the per-step policies, checkpoints that a re-run reuses,
cancellation, and the synchronous and async calls, on both storage backends."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import replace
from datetime import timedelta
from typing import Any

import orjson
import pytest

from app.core.clock import utcnow
from app.credentials.entities import Provider
from app.gateway.calls import CallContext, Caller
from app.knowledge.steps import Found, Grades
from app.models.entities import Model
from app.models.schemas import ModelParameters
from app.operations.entities import Operation, OperationStatus
from app.storage.protocol import Where
from app.usage.entities import UsageRecord
from app.webhooks.entities import WebhookDelivery
from app.workflows.entities import WorkflowStepRun
from tests.gateway.upstream import FakeUpstream, Fault
from tests.webhooks.receiver import Received, Receiver, Reply
from tests.workflows.conftest import ADMIN, Gateway, chat_step


def transform(name: str, value: Any, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": "transform", "value": value, **extra}


def http_step(name: str, path: str = "/x", **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": "http_request", "external_api_id": "api", "path": path, **extra}


def said(upstream: FakeUpstream, text: str) -> int:
    """How many chat calls the upstream got whose last message was `text`."""
    return sum(1 for s in upstream.seen if s.body["messages"][-1].get("content") == text)


class Api:
    """A loopback HTTP API with scripted answers, as `http_request` steps call it."""

    def __init__(self) -> None:
        self.receiver = Receiver(self._respond)
        self.script: list[Reply] = []
        self.delay = 0.0
        self.in_flight = 0
        self.most_in_flight = 0

    async def _respond(self, request: Received) -> Reply:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.script:
                return self.script.pop(0)
            body = {"path": request.path, "method": request.method, "got": request.body.decode()}
            return 200, orjson.dumps(body), {"content-type": "application/json"}
        finally:
            self.in_flight -= 1

    @property
    def requests(self) -> list[Received]:
        return self.receiver.requests


@pytest.fixture
async def api(gateway: Gateway) -> AsyncIterator[Api]:
    served = Api()
    await served.receiver.start()
    base = f"http://127.0.0.1:{served.receiver.port}/base"
    await gateway.admin(
        "/admin/credentials",
        {
            "id": "api-key",
            "provider": "http_api_key",
            "secret": "api-secret-1234567",
            "header_name": "x-api-key",
            "header_value_template": "{secret}",
        },
    )
    await gateway.admin(
        "/admin/external-apis",
        {
            "id": "api",
            "name": "API",
            "base_url": base,
            "base_headers": {"x-team": "blue"},
            "credential_id": "api-key",
        },
    )
    yield served
    await served.receiver.close()


class Library:
    """A knowledge base stand-in: what the knowledge service gives workflow steps."""

    def __init__(self) -> None:
        self.searches: list[tuple[str | None, str, str]] = []
        self.contexts: list[CallContext] = []

    async def exists(self, kb_id: str) -> bool:
        return kb_id == "docs"

    async def search(
        self,
        caller: Caller,
        kb_id: str,
        query: str,
        top_k: int,
        min_score: float | None,
        filter: Mapping[str, Any] | None,
        *,
        context: CallContext,
    ) -> Found:
        self.searches.append((caller.key_id, kb_id, query))
        self.contexts.append(context)
        documents = [
            {"id": "d1", "content": f"about {query}", "score": 0.9},
            {"id": "d2", "content": "off topic", "score": 0.4},
        ][:top_k]
        return Found(documents, prompt_tokens=4, cost_micros=1)

    async def grade(
        self,
        caller: Caller,
        query: str,
        chunks: Sequence[Mapping[str, Any]],
        judge_model: str,
        thresholds: Mapping[str, float],
        *,
        context: CallContext,
    ) -> Grades:
        kept = [dict(c) for c in chunks if c["score"] >= thresholds["threshold"]]
        output = {"documents": kept, "scores": {c["id"]: c["score"] for c in chunks}}
        return Grades(output, prompt_tokens=30, completion_tokens=6, cost_micros=5)


@pytest.fixture
def library(gateway: Gateway) -> Library:
    found = Library()
    # Where `build_services` wires the knowledge service in.
    engine = gateway.services.engine
    engine.deps = replace(engine.deps, knowledge=found)
    return found


# ---- a whole workflow ----------------------------------------------------------------------


SIX_STEPS = [
    {
        "name": "ask",
        "type": "chat_completion",
        "model_id": "llm",
        "prompt_id": "rephrase",
        "prompt_variables": {"question": "${request:question}"},
    },
    {
        "name": "search",
        "type": "knowledge_base_search",
        "knowledge_base_id": "docs",
        "query": "${step:ask:content}",
        "top_k": 5,
    },
    {
        "name": "grade",
        "type": "crag_scoring",
        "model_id": "judge",
        "query": "${request:question}",
        "documents_source": "${step:search:documents}",
        "threshold": 0.5,
    },
    {
        "name": "enough",
        "type": "conditional",
        "conditions": [
            {
                "field": "${step:grade:documents}",
                "operator": "is_empty",
                "action": {"end_workflow": {"answer": "nothing found"}},
            }
        ],
    },
    http_step("ticket", "/tickets", method="POST", body={"docs": "${step:grade:documents}"}),
    chat_step(
        "answer", "Answer with ${step:grade:documents.0.content} (${step:ticket:status_code})"
    ),
]


LEASES = "A lease is a claim on a job for a time, renewed by heartbeats."
CAMELS = "Camels cross hot deserts for days without water."


@pytest.fixture
async def knowledge(gateway: Gateway) -> None:
    """A real knowledge base `docs` (built-in mock embeddings) holding two ingested documents,
    and a mock `judge` model that grades only the lease document relevant."""
    await gateway.admin(
        "/admin/knowledge-bases",
        {"id": "docs", "name": "Docs", "embedding_model": "mock-embedding"},
    )
    for title, content in (("leases", LEASES), ("camels", CAMELS)):
        await gateway.admin(
            "/admin/knowledge-bases/docs/documents",
            {"title": title, "content": content},
            status=202,
        )
    assert await gateway.run_jobs() == 2
    # The mock answers by what the judge's prompt holds: only the lease text scores (any other
    # answer holds no score, which grades 0).
    async with gateway.storage.unit_of_work() as uow:
        await uow.repo(Model).add(
            Model(
                id="judge",
                name="judge",
                provider=Provider.MOCK,
                provider_model="mock",
                parameters=ModelParameters(
                    mock_replies={"renewed by heartbeats": '{"score": 0.95}'}
                ).as_dict(),
            )
        )
        await uow.commit()


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_six_step_workflow_runs_and_records_every_step_and_its_usage(
    gateway: Gateway, upstream: FakeUpstream, api: Api, knowledge: None, mode: str
) -> None:
    await gateway.admin(
        "/admin/prompts", {"id": "rephrase", "content": "Rephrase: ${var:question}"}
    )
    await gateway.workflow(SIX_STEPS)
    run_input = {"question": "what is a lease?"}
    if mode == "sync":
        run = await gateway.execute(run_input=run_input)
    else:
        accepted = await gateway.execute(run_input=run_input, query="?async=true", status=202)
        assert accepted["status"] == "pending"
        assert await gateway.run_jobs() == 1
        operation = await gateway.operation(accepted["operation_id"])
        assert operation["status"] == "completed"
        assert operation["progress"]["steps_completed"] == 6
        run = {"operation_id": operation["id"], **operation["result"]}
    assert run["output"]["content"] == f"echo: Answer with {LEASES} (200)"
    assert [s["name"] for s in run["steps"]] == [s["name"] for s in SIX_STEPS]
    assert {s["status"] for s in run["steps"]} == {"completed"}
    steps = await gateway.steps(run["operation_id"])
    assert [s["name"] for s in steps] == [s["name"] for s in SIX_STEPS]
    assert steps[0]["input"]["messages"][0]["prompt_id"] == "rephrase"
    # The search embedded the rephrased question and found both ingested documents.
    assert steps[1]["input"]["query"] == "echo: Rephrase: what is a lease?"
    assert sorted(d["content"] for d in steps[1]["output"]["documents"]) == sorted([LEASES, CAMELS])
    # The judge graded both; only the lease document passed.
    graded = steps[2]["output"]
    assert [d["content"] for d in graded["documents"]] == [LEASES]
    assert graded["verdict"] == "correct" and sorted(graded["scores"].values()) == [0.0, 0.95]
    assert steps[3]["output"] == {"matched": None, "action": "continue"}
    assert orjson.loads(api.requests[0].body) == {"docs": graded["documents"]}
    assert steps[4]["output"]["status_code"] == 200
    # The usage of every LLM call is recorded for the run: the two chat steps, the search's
    # query embedding and one judge call per graded document.
    async with gateway.storage.unit_of_work() as uow:
        records = (
            await uow.repo(UsageRecord).find(Where.eq("operation_id", run["operation_id"]))
        ).items
    assert sorted(r.model_id for r in records) == ["judge", "judge", "llm", "llm", "mock-embedding"]
    listed = await gateway.http.get("/admin/usage?limit=1000", headers=ADMIN)
    assert listed.status_code == 200, listed.text
    of_run = [r for r in listed.json()["data"] if r["operation_id"] == run["operation_id"]]
    assert sorted(r["id"] for r in of_run) == sorted(r.id for r in records)
    chat_records = [r for r in records if r.model_id == "llm"]
    llm_steps = [s for s in steps if s["type"] == "chat_completion"]
    assert sum(s["prompt_tokens"] for s in llm_steps) == sum(r.input_tokens for r in chat_records)
    # The search's and the grading's step records show what their calls used, as the records do.
    embedding = [r for r in records if r.model_id == "mock-embedding"]
    judge = [r for r in records if r.model_id == "judge"]
    assert steps[1]["prompt_tokens"] == sum(r.input_tokens for r in embedding) > 0
    assert steps[2]["prompt_tokens"] == sum(r.input_tokens for r in judge) > 0
    assert steps[2]["completion_tokens"] == sum(r.output_tokens for r in judge) > 0
    assert run["usage"]["prompt_tokens"] == sum(s["prompt_tokens"] for s in steps)
    assert run["usage"]["prompt_tokens"] == sum(r.input_tokens for r in records)


async def test_end_workflow_ends_the_run_with_its_value(
    gateway: Gateway, upstream: FakeUpstream, api: Api, knowledge: None
) -> None:
    await gateway.admin("/admin/prompts", {"id": "rephrase", "content": "${var:question}"})
    steps = [dict(s) for s in SIX_STEPS]
    steps[2] = {**steps[2], "threshold": 0.99}
    await gateway.workflow(steps)
    run = await gateway.execute(run_input={"question": "q"})
    assert run["output"] == {"answer": "nothing found"}
    assert [s["name"] for s in run["steps"]] == ["ask", "search", "grade", "enough"]
    assert api.requests == []


async def test_a_knowledge_step_naming_an_unknown_base_is_refused_at_save(
    gateway: Gateway,
) -> None:
    response = await gateway.http.post(
        "/admin/workflows",
        json={
            "id": "flow",
            "name": "a flow",
            "steps": [
                {
                    "name": "s",
                    "type": "knowledge_base_search",
                    "knowledge_base_id": "kb",
                    "query": "q",
                }
            ],
        },
        headers=ADMIN,
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "steps[0].knowledge_base_id"


# ---- step types ----------------------------------------------------------------------------


async def test_http_request_sends_headers_in_order_and_extracts_from_the_answer(
    gateway: Gateway, api: Api
) -> None:
    await gateway.workflow(
        [
            http_step(
                "h",
                "/items/${request:id}",
                query={"q": "${request:id}"},
                headers={"x-team": "red", "x-trace": "t-${request:id}"},
                extract_path="$.path",
            )
        ]
    )
    run = await gateway.execute(run_input={"id": 7})
    assert run["output"]["extracted"] == "/base/items/7?q=7"
    sent = api.requests[0]
    assert sent.headers["x-api-key"] == "api-secret-1234567"
    assert sent.headers["x-team"] == "red" and sent.headers["x-trace"] == "t-7"
    recorded = (await gateway.steps(run["operation_id"]))[0]
    assert "api-secret" not in orjson.dumps(recorded).decode()


async def test_http_request_cannot_leave_the_apis_host_or_follow_a_redirect_inward(
    gateway: Gateway, api: Api
) -> None:
    await gateway.workflow([http_step("h", "${request:path}", follow_redirects=True)])
    off = await gateway.execute(run_input={"path": "@10.0.0.1/x"})
    assert off["success"] is True and api.requests[0].path == "/base/@10.0.0.1/x"
    api.script = [(302, b"", {"location": "http://169.254.169.254/latest/meta-data"})]
    redirected = await gateway.execute(run_input={"path": "/go"})
    assert redirected["success"] is False
    assert redirected["steps"][0]["error"]["type"] == "forbidden_destination"


async def test_an_error_status_fails_the_step_unless_told_otherwise(
    gateway: Gateway, api: Api
) -> None:
    await gateway.workflow([http_step("h"), transform("t", "${step:h:status_code}")])
    api.script = [(404, b"no such thing")]
    failed = await gateway.execute()
    assert failed["error"]["message"] == "step 'h' failed: the API answered HTTP 404: no such thing"
    await gateway.http.patch(
        "/admin/workflows/flow",
        json={
            "steps": [http_step("h", fail_on_error=False), transform("t", "${step:h:status_code}")]
        },
        headers=ADMIN,
    )
    api.script = [(404, b"no such thing")]
    assert (await gateway.execute())["output"] == 404


async def test_parallel_branches_and_map_items_each_record_their_steps(
    gateway: Gateway, api: Api
) -> None:
    await gateway.workflow(
        [
            transform("ids", [1, 2, 3, 4, 5]),
            {
                "name": "both",
                "type": "parallel",
                "branches": {
                    "left": [transform("l1", "L"), transform("l2", "${step:l1}${step:ids:0}")],
                    "right": [transform("r1", "R")],
                },
            },
            {
                "name": "each",
                "type": "map",
                "items": "${step:ids}",
                "concurrency": 2,
                "steps": [http_step("get", "/n/${item}", extract_path="$.path")],
            },
            transform("out", {"both": "${step:both}", "each": "${step:each}"}),
        ]
    )
    api.delay = 0.05
    run = await gateway.execute()
    assert run["output"]["both"] == {"left": "L1", "right": "R"}
    assert [o["extracted"] for o in run["output"]["each"]] == [f"/base/n/{i}" for i in range(1, 6)]
    assert api.most_in_flight == 2
    paths = {s["path"] for s in await gateway.steps(run["operation_id"])}
    assert {"both/left/l1", "both/left/l2", "both/right/r1", "each[0]/get", "each[4]/get"} <= paths


async def test_go_to_step_jumps_and_a_loop_stops_at_the_visit_cap(gateway: Gateway) -> None:
    jump = {
        "name": "jump",
        "type": "conditional",
        "conditions": [
            {
                "field": "${request:skip}",
                "operator": "eq",
                "value": True,
                "action": {"go_to_step": "c"},
            }
        ],
    }
    await gateway.workflow([transform("a", "A"), jump, transform("b", "B"), transform("c", "C")])
    skipped = await gateway.execute(run_input={"skip": True})
    assert [s["name"] for s in skipped["steps"]] == ["a", "jump", "c"]
    loop = {
        **jump,
        "name": "again",
        "conditions": [{**jump["conditions"][0], "action": {"go_to_step": "a"}}],
    }
    await gateway.workflow([transform("a", "A"), loop], id="loop")
    looped = await gateway.execute("loop", run_input={"skip": True})
    assert looped["success"] is False and "visited 100 steps" in looped["error"]["message"]
    assert {s["path"] for s in looped["steps"]} >= {"a", "a#2", "again#50"}


# ---- per-step policies ---------------------------------------------------------------------


async def test_on_error_skip_goes_on_without_an_output_and_default_with_one(
    gateway: Gateway, api: Api
) -> None:
    await gateway.workflow(
        [
            http_step("skipped", on_error="skip"),
            http_step("defaulted", on_error="default", default={"status_code": 0}),
            transform("t", ["${step:skipped:status_code:none}", "${step:defaulted:status_code}"]),
        ]
    )
    api.script = [(400, b"bad"), (400, b"bad")]
    run = await gateway.execute()
    assert run["output"] == ["none", 0]
    assert [s["status"] for s in run["steps"]] == ["skipped", "defaulted", "completed"]
    assert run["steps"][0]["error"]["type"] == "http_request_failed"


async def test_retry_tries_a_transient_failure_again_with_backoff(
    gateway: Gateway, api: Api
) -> None:
    await gateway.workflow([http_step("h", retry={"attempts": 3, "backoff_ms": 50})])
    api.script = [(503, b"busy"), (503, b"busy")]
    started = time.monotonic()
    run = await gateway.execute()
    assert run["success"] is True and run["steps"][0]["attempts"] == 3
    assert time.monotonic() - started >= 0.05 + 0.1
    api.script = [(400, b"bad")]
    once = await gateway.execute()
    assert once["success"] is False and once["steps"][0]["attempts"] == 1, "4xx is not retried"


async def test_timeout_ms_bounds_a_step(gateway: Gateway, api: Api) -> None:
    await gateway.workflow([http_step("h", timeout_ms=100, on_error="default", default="late")])
    api.delay = 1.0
    started = time.monotonic()
    run = await gateway.execute()
    assert run["output"] == "late" and time.monotonic() - started < 0.9
    assert run["steps"][0]["error"]["type"] in ("step_timeout", "outbound_failed")


async def test_an_output_that_breaks_its_schema_fails_the_step_naming_the_field(
    gateway: Gateway,
) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    await gateway.workflow([transform("t", {"n": "${request:n}"}, output_schema=schema)])
    assert (await gateway.execute(run_input={"n": 3}))["output"] == {"n": 3}
    broken = await gateway.execute(run_input={"n": "three"})
    assert broken["error"]["type"] == "workflow_step_failed"
    assert "output.n breaks output_schema" in broken["error"]["message"]


# ---- checkpoints, retries of the job, cancellation -----------------------------------------


async def test_a_retried_run_reuses_finished_steps_and_repeats_no_llm_call(
    gateway: Gateway, upstream: FakeUpstream, api: Api
) -> None:
    await gateway.workflow([chat_step("first", "one"), http_step("h"), chat_step("last", "two")])
    api.script = [(503, b"busy")]  # the job's first attempt fails at `h`, transiently
    accepted = await gateway.execute(query="?async=true", status=202)
    await gateway.run_jobs()
    operation = await gateway.operation(accepted["operation_id"])
    assert operation["status"] == "completed" and operation["attempts"] == 2
    assert said(upstream, "one") == 1 and said(upstream, "two") == 1
    steps = {s["name"]: s for s in await gateway.steps(operation["id"])}
    assert steps["h"]["attempts"] == 2 and steps["first"]["attempts"] == 1


async def test_a_run_whose_worker_died_mid_step_resumes_at_that_step(
    gateway: Gateway, upstream: FakeUpstream
) -> None:
    await gateway.workflow([chat_step("a", "one"), chat_step("b", "two"), chat_step("c", "three")])
    upstream.fail("up-llm", Fault(), Fault(delay=5))  # `b` hangs on the first try
    accepted = await gateway.execute(query="?async=true", status=202)
    operation_id = accepted["operation_id"]
    gateway.queue.sent.clear()
    worker = asyncio.ensure_future(gateway.runner().execute(operation_id))
    for _ in range(200):
        if said(upstream, "two"):
            break
        await asyncio.sleep(0.01)
    worker.cancel()  # the worker dies with `b` in flight: its lease is left to expire
    await asyncio.gather(worker, return_exceptions=True)
    async with gateway.storage.unit_of_work() as uow:
        await uow.repo(Operation).write_where(
            operation_id, {"lease_expires_at": utcnow() - timedelta(seconds=1)}
        )
        await uow.commit()
    report = await gateway.runner().sweep()
    assert report.recovered == 1
    await gateway.run_jobs()
    operation = await gateway.operation(operation_id)
    assert operation["status"] == "completed"
    assert [e["outcome"] for e in operation["attempt_log"]] == ["lost", "completed"]
    assert (said(upstream, "one"), said(upstream, "two"), said(upstream, "three")) == (1, 2, 1)


async def test_cancelling_a_run_stops_it_before_its_next_step(
    gateway: Gateway, upstream: FakeUpstream
) -> None:
    await gateway.workflow([chat_step("a", "one"), chat_step("b", "two"), chat_step("c", "three")])
    upstream.fail("up-llm", Fault(), Fault(delay=1.5))
    accepted = await gateway.execute(query="?async=true", status=202)
    operation_id = accepted["operation_id"]
    gateway.queue.sent.clear()
    worker = asyncio.ensure_future(gateway.runner().execute(operation_id))
    for _ in range(200):
        if said(upstream, "two"):
            break
        await asyncio.sleep(0.01)
    cancelled = await gateway.http.delete(f"/v1/operations/{operation_id}", headers=ADMIN)
    assert cancelled.json()["status"] == "cancelled"
    await asyncio.wait_for(worker, 5)
    await asyncio.sleep(0.1)
    assert said(upstream, "three") == 0
    assert (await gateway.operation(operation_id))["status"] == "cancelled"
    async with gateway.storage.unit_of_work() as uow:
        recorded = (
            await uow.repo(WorkflowStepRun).find(Where.eq("operation_id", operation_id))
        ).items
    assert [r.step_name for r in recorded] == ["a"], "no step is recorded once cancelled"


async def test_a_synchronous_run_longer_than_the_wait_answers_202_and_goes_on(
    gateway: Gateway, upstream: FakeUpstream
) -> None:
    await gateway.workflow([chat_step("a", "one"), transform("t", "${step:a:content}")])
    upstream.fail("up-llm", Fault(delay=0.5))
    accepted = await gateway.execute(query="?wait=0.1", status=202)
    assert gateway.queue.sent == [], "the API process runs it"
    response = await gateway.http.get(
        f"/v1/operations/{accepted['operation_id']}?wait=5", headers=ADMIN
    )
    assert response.json()["status"] == "completed"
    assert response.json()["result"]["output"] == "echo: one"


async def test_async_with_wait_answers_with_the_run_once_it_finished(gateway: Gateway) -> None:
    await gateway.workflow([transform("t", "done")])

    async def work() -> None:
        for _ in range(500):
            if gateway.queue.sent:
                break
            await asyncio.sleep(0.01)
        await gateway.run_jobs()

    worker = asyncio.ensure_future(work())
    run = await gateway.execute(query="?async=true&wait=5")
    await worker
    assert run["status"] == "completed" and run["output"] == "done"


async def test_only_the_runs_owner_reads_its_steps(gateway: Gateway) -> None:
    await gateway.workflow([transform("t", 1)])
    alice, bob = await gateway.key(), await gateway.key()
    run = await gateway.execute(headers=alice)
    path = f"/v1/workflows/runs/{run['operation_id']}/steps"
    assert (await gateway.http.get(path, headers=alice)).status_code == 200
    assert (await gateway.http.get(path, headers=bob)).status_code == 404
    assert (await gateway.http.get(path, headers=ADMIN)).status_code == 200


async def test_a_failed_runs_operation_names_the_step(gateway: Gateway, api: Api) -> None:
    await gateway.workflow([transform("t", 1), http_step("h")])
    api.script = [(422, b"nope")]
    accepted = await gateway.execute(query="?async=true", status=202)
    await gateway.run_jobs()
    operation = await gateway.operation(accepted["operation_id"])
    assert operation["status"] == "failed" and operation["attempts"] == 1
    assert operation["error"]["type"] == "workflow_step_failed"
    assert operation["error"]["message"].startswith("step 'h' failed")
    steps = await gateway.steps(operation["id"])
    assert [s["status"] for s in steps] == ["completed", "failed"]
    assert OperationStatus.FAILED.value == operation["status"]


async def test_a_knowledge_base_is_checked_on_save_once_knowledge_bases_are_wired(
    gateway: Gateway, library: Library
) -> None:
    search = {
        "name": "s",
        "type": "knowledge_base_search",
        "knowledge_base_id": "gone",
        "query": "q",
    }
    refused = await gateway.admin(
        "/admin/workflows", {"id": "kb", "name": "kb", "steps": [search]}, status=400
    )
    assert refused["error"]["param"] == "steps[0].knowledge_base_id"
    await gateway.workflow([{**search, "knowledge_base_id": "docs"}])


async def test_a_finished_run_is_announced_as_a_workflow_run_event(
    gateway: Gateway, api: Api
) -> None:
    await gateway.admin(
        "/admin/webhooks", {"url": "https://example.com/hook", "events": ["workflow_run.*"]}
    )
    await gateway.workflow([transform("t", 1), http_step("h")])
    ok = await gateway.execute()
    api.script = [(422, b"nope")]
    failed = await gateway.execute()
    async with gateway.storage.unit_of_work() as uow:
        deliveries = (await uow.repo(WebhookDelivery).find()).items
    announced = {d.payload["data"]["operation"]["id"]: d.event_type for d in deliveries}
    assert announced == {
        ok["operation_id"]: "workflow_run.completed",
        failed["operation_id"]: "workflow_run.failed",
    }


async def test_a_dry_run_mocks_the_steps_asked_runs_the_others_and_records_nothing(
    gateway: Gateway, upstream: FakeUpstream, api: Api
) -> None:
    await gateway.workflow(
        [chat_step("ask", "one"), http_step("h"), transform("t", "${step:ask:content}")]
    )
    mocks = {"ask": {"content": "mocked answer"}}
    response = await gateway.http.post(
        "/admin/workflows/flow/test", json={"step_mocks": mocks}, headers=ADMIN
    )
    tested = response.json()
    assert response.status_code == 200 and tested["success"] is True, tested
    assert tested["output"] == "mocked answer"
    assert [(s["name"], s["status"]) for s in tested["steps"]] == [
        ("ask", "completed"),
        ("h", "completed"),
        ("t", "completed"),
    ]
    assert said(upstream, "one") == 0 and len(api.requests) == 1
    skipping = await gateway.http.post(
        "/admin/workflows/flow/test", json={"step_mocks": mocks, "mock_all": True}, headers=ADMIN
    )
    assert [s["status"] for s in skipping.json()["steps"]] == ["completed", "skipped", "skipped"]
    assert len(api.requests) == 1
    unknown = await gateway.http.post(
        "/admin/workflows/flow/test", json={"step_mocks": {"nope": 1}}, headers=ADMIN
    )
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "step_mocks.nope"
    async with gateway.storage.unit_of_work() as uow:
        assert await uow.repo(WorkflowStepRun).count() == 0
        assert await uow.repo(Operation).count() == 0

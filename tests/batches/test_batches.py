"""The Batch API through the official `openai` SDK, with the child jobs run in-process."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI

from app.batches.entities import Batch, StoredFile
from app.batches.service import BatchService, _failed_line
from app.config import Settings
from app.core.clock import utcnow
from app.core.provide import register
from app.main import create_app
from app.operations.entities import Operation, OperationStatus
from app.operations.runner import JobTimings, OperationRunner
from app.queue.names import OperationKind
from app.services import Services, build_handlers
from app.storage.protocol import Storage, UnitOfWork, Where
from tests.fakes import RecordingQueue

FAST = JobTimings(lease=5, heartbeat=1, retry_base=0.01, retry_max=0.02, resend_after=0.2)


@dataclass
class RecordingSink:
    """Keeps every event with the unit of work it was recorded in; can be made to fail."""

    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    fail: bool = False

    async def record(self, uow: UnitOfWork, event_type: str, data: dict[str, Any]) -> None:
        if self.fail:
            raise RuntimeError("event store down (fake)")
        uow.on_commit(lambda: self._keep(event_type, data))

    async def interested(self, event_type: str) -> bool:
        return True

    async def _keep(self, event_type: str, data: dict[str, Any]) -> None:
        self.events.append((event_type, data))


@dataclass
class Gateway:
    app: FastAPI
    storage: Storage
    queue: RecordingQueue
    events: RecordingSink

    @property
    def services(self) -> Services:
        services: Services = self.app.state.services
        return services

    async def key(self) -> str:
        _, secret = await self.services.keys.create_key(name="batch client")
        return secret

    def sdk(self, secret: str) -> openai.AsyncOpenAI:
        transport = httpx.ASGITransport(app=self.app)
        http = httpx.AsyncClient(transport=transport, base_url="http://gateway")
        return openai.AsyncOpenAI(
            api_key=secret,
            base_url="http://gateway/v1",
            # The SDK is typed against its own fork of httpx; an httpx client works the same.
            http_client=http,  # type: ignore[arg-type]
            max_retries=0,
        )

    async def run_jobs(self, limit: int | None = None) -> int:
        """Execute the jobs sent so far (at most `limit`), as a worker would."""
        runner = OperationRunner(
            self.storage, self.queue, build_handlers(self.services), timings=FAST
        )
        ran = 0
        while self.queue.sent and (limit is None or ran < limit):
            sent = self.queue.sent.pop(0)
            await runner.execute(sent.operation_id)
            ran += 1
        return ran

    async def batch_row(self, batch_id: str) -> Batch:
        async with self.storage.unit_of_work() as uow:
            batch = await uow.repo(Batch).get(batch_id)
        assert batch is not None
        return batch


@pytest.fixture
async def gateway(storage: Storage) -> AsyncIterator[Gateway]:
    async with running(storage) as gateway_:
        yield gateway_


@asynccontextmanager
async def running(storage: Storage, **settings: Any) -> AsyncIterator[Gateway]:
    """The app with its lifespan started, and a batch service whose events are recorded."""
    queue = RecordingQueue(storage)
    config = Settings(BROKER="stub", **settings)
    app = create_app(config, storage=storage, queue=queue)
    gateway_ = Gateway(app, storage, queue, RecordingSink())
    async with app.router.lifespan_context(app):
        services = gateway_.services
        services.batches = BatchService(
            storage,
            services.operations,
            services.files,
            gateway_.events,
            max_requests=config.BATCH_MAX_REQUESTS,
        )
        register(app, services.by_type())  # the routes are handed the replacement
        yield gateway_


def line(custom_id: str, content: str = "hello", **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "mock", "messages": [{"role": "user", "content": content}], **body},
    }


def jsonl(*records: Any) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records).encode()


async def upload(client: openai.AsyncOpenAI, content: bytes) -> str:
    created = await client.files.create(file=("requests.jsonl", content), purpose="batch")
    return created.id


async def start(client: openai.AsyncOpenAI, content: bytes, **extra: Any) -> Any:
    file_id = await upload(client, content)
    return await client.batches.create(
        input_file_id=file_id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        **extra,
    )


async def lines_of(client: openai.AsyncOpenAI, file_id: str | None) -> list[dict[str, Any]]:
    assert file_id is not None
    content = await client.files.content(file_id)
    return [json.loads(raw) for raw in content.text.splitlines()]


def by_custom_id(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["custom_id"]: r for r in records}


# ---- the SDK flow -----------------------------------------------------------------------------


async def test_the_sdk_flow_runs_every_line_and_returns_outputs_keyed_by_custom_id(
    gateway: Gateway,
) -> None:
    client = gateway.sdk(await gateway.key())
    content = jsonl(line("a", "first"), line("b", "second"), line("c", "third"))
    file_id = await upload(client, content)
    described = await client.files.retrieve(file_id)
    assert (described.purpose, described.bytes, described.object) == ("batch", len(content), "file")
    assert (await client.files.content(file_id)).content == content

    batch = await client.batches.create(
        input_file_id=file_id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"project": "nightly"},
    )
    assert batch.status == "in_progress" and batch.object == "batch"
    assert batch.request_counts is not None and batch.request_counts.total == 3
    assert batch.metadata == {"project": "nightly"}
    assert batch.expires_at is not None and batch.expires_at - batch.created_at == 24 * 3600

    assert await gateway.run_jobs() == 3
    pending = await client.batches.retrieve(batch.id)
    # Every request ran; the files are written by the next periodic pass.
    assert pending.status == "finalizing" and pending.finalizing_at is not None
    assert pending.request_counts is not None and pending.request_counts.completed == 3

    assert await gateway.services.batches.process_due() == 1
    done = await client.batches.retrieve(batch.id)
    assert done.status == "completed" and done.completed_at is not None
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed) == (3, 3)
    assert done.request_counts.failed == 0 and done.error_file_id is None
    outputs = by_custom_id(await lines_of(client, done.output_file_id))
    assert set(outputs) == {"a", "b", "c"}
    answer = outputs["b"]
    assert answer["error"] is None and answer["id"].startswith("batch_req_")
    assert answer["response"]["status_code"] == 200
    assert answer["response"]["body"]["object"] == "chat.completion"
    assert answer["response"]["body"]["choices"][0]["message"]["content"].endswith("second")

    listed = [b.id async for b in client.batches.list(limit=1)]
    assert listed == [batch.id]
    assert [t for t, _ in gateway.events.events] == ["batch.completed"]
    assert gateway.events.events[0][1]["output_file_id"] == done.output_file_id
    assert await gateway.services.batches.process_due() == 0  # finished once, not again


async def test_listing_batches_pages_by_id_newest_first(gateway: Gateway) -> None:
    client = gateway.sdk(await gateway.key())
    created = [(await start(client, jsonl(line("x")))).id for _ in range(3)]
    first = await client.batches.list(limit=2)
    assert [b.id for b in first.data] == created[::-1][:2] and first.has_more
    everything = [b.id async for b in client.batches.list(limit=2)]
    assert everything == created[::-1]
    files = [f.id async for f in client.files.list(limit=1)]
    assert len(files) == 3


# ---- invalid lines ----------------------------------------------------------------------------


async def test_invalid_lines_are_reported_per_line_and_the_rest_still_run(
    gateway: Gateway,
) -> None:
    client = gateway.sdk(await gateway.key())
    no_custom_id = line("ignored")
    del no_custom_id["custom_id"]
    content = jsonl(
        line("ok"),
        "{not json",
        no_custom_id,
        line("ok"),  # a duplicate custom_id
        {**line("get"), "method": "GET"},
        {**line("url"), "url": "/v1/embeddings"},
        line("hot", temperature=5),
        {**line("unknown-model"), "body": {"model": "nope", "messages": [{"role": "user"}]}},
        line("streamed", stream=True),
    )
    batch = await start(client, content)
    assert batch.request_counts is not None and batch.request_counts.total == 9
    assert batch.request_counts.failed == 7  # refused before running
    await gateway.run_jobs()
    await gateway.services.batches.process_due()
    done = await client.batches.retrieve(batch.id)
    assert done.status == "completed"
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (1, 8)
    assert [r["custom_id"] for r in await lines_of(client, done.output_file_id)] == ["ok"]

    errors = await lines_of(client, done.error_file_id)
    assert len(errors) == 8
    refused = [e for e in errors if e["response"] is None]
    assert [(e["error"]["line"], e["error"]["code"]) for e in refused] == [
        (2, "invalid_json_line"),
        (3, "missing_custom_id"),
        (4, "duplicate_custom_id"),
        (5, "invalid_method"),
        (6, "invalid_url"),
        (7, "invalid_body"),
        (9, "invalid_body"),
    ]
    assert refused[5]["custom_id"] == "hot" and refused[5]["error"]["param"] == "body.temperature"
    assert refused[6]["error"]["param"] == "body.stream"
    (failed,) = [e for e in errors if e["response"] is not None]
    assert failed["custom_id"] == "unknown-model"
    assert failed["response"]["status_code"] == 404
    assert failed["response"]["body"]["error"]["type"] == "not_found_error"


async def test_a_batch_of_only_invalid_lines_completes_at_once_with_an_error_file(
    gateway: Gateway,
) -> None:
    client = gateway.sdk(await gateway.key())
    batch = await start(client, jsonl({"custom_id": "a"}, '{"custom_id": "b", "method": 1}'))
    assert batch.status == "completed" and batch.output_file_id is None
    assert gateway.queue.sent == []
    codes = [e["error"]["code"] for e in await lines_of(client, batch.error_file_id)]
    assert codes == ["invalid_method", "invalid_method"]


async def test_a_batch_over_the_request_limit_fails_with_the_reason(storage: Storage) -> None:
    async with running(storage, BATCH_MAX_REQUESTS=2) as gateway:
        client = gateway.sdk(await gateway.key())
        batch = await start(client, jsonl(line("a"), line("b"), line("c")))
        assert batch.status == "failed" and batch.failed_at is not None
        assert batch.errors is not None and batch.errors.data is not None
        assert batch.errors.data[0].code == "too_many_requests"
        assert gateway.queue.sent == []
        assert [t for t, _ in gateway.events.events] == ["batch.failed"]


# ---- cancellation and expiry ------------------------------------------------------------------


async def test_cancelling_keeps_the_answers_already_given(gateway: Gateway) -> None:
    client = gateway.sdk(await gateway.key())
    batch = await start(client, jsonl(*(line(f"r{i}", f"text {i}") for i in range(4))))
    await gateway.run_jobs(limit=2)
    cancelling = await client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
    assert (await client.batches.cancel(batch.id)).status == "cancelling"  # idempotent
    await gateway.run_jobs()  # the remaining deliveries find their jobs cancelled
    await gateway.services.batches.process_due()

    done = await client.batches.retrieve(batch.id)
    assert done.status == "cancelled" and done.cancelled_at is not None
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (2, 2)
    # The two lines that ran before the cancel (a batch's children are sent together, in no
    # order) keep their answers; the other two are cancelled.
    answered = sorted(r["custom_id"] for r in await lines_of(client, done.output_file_id))
    errors = await lines_of(client, done.error_file_id)
    assert len(answered) == 2
    assert sorted(e["custom_id"] for e in errors) == sorted({"r0", "r1", "r2", "r3"} - {*answered})
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    assert [t for t, _ in gateway.events.events] == ["batch.cancelled"]


async def test_a_finished_batch_cannot_be_cancelled(gateway: Gateway) -> None:
    client = gateway.sdk(await gateway.key())
    batch = await start(client, jsonl(line("only")))
    await gateway.run_jobs()
    with pytest.raises(openai.ConflictError):
        await client.batches.cancel(batch.id)  # finalizing: every request has run
    await gateway.services.batches.process_due()
    with pytest.raises(openai.ConflictError):
        await client.batches.cancel(batch.id)
    assert (await client.batches.retrieve(batch.id)).status == "completed"


async def test_an_overdue_batch_expires_keeping_its_answers(gateway: Gateway) -> None:
    client = gateway.sdk(await gateway.key())
    batch = await start(client, jsonl(line("a"), line("b"), line("c")))
    await gateway.run_jobs(limit=1)
    assert await gateway.services.batches.process_due() == 0  # not due yet
    row = await gateway.batch_row(batch.id)
    async with gateway.storage.unit_of_work() as uow:
        row.expires_at = utcnow() - timedelta(seconds=1)
        await uow.repo(Batch).update(row)
        await uow.commit()

    assert await gateway.services.batches.process_due() == 1
    done = await client.batches.retrieve(batch.id)
    assert done.status == "expired" and done.expired_at is not None
    # The one line that ran before the deadline (its children are sent together, in no order)
    # keeps its answer; the other two expire.
    (answered,) = [r["custom_id"] for r in await lines_of(client, done.output_file_id)]
    errors = await lines_of(client, done.error_file_id)
    assert sorted((e["custom_id"], e["error"]["code"]) for e in errors) == [
        (custom_id, "batch_expired") for custom_id in sorted({"a", "b", "c"} - {answered})
    ]
    async with gateway.storage.unit_of_work() as uow:
        children = await uow.repo(Operation).find(Where.eq("parent_id", row.operation_id))
    assert {c.status for c in children.items} == {
        OperationStatus.COMPLETED,
        OperationStatus.CANCELLED,
    }
    assert [t for t, _ in gateway.events.events] == ["batch.expired"]


async def test_a_failure_while_finalizing_leaves_the_batch_finalizing_and_no_files(
    gateway: Gateway,
) -> None:
    client = gateway.sdk(await gateway.key())
    batch = await start(client, jsonl(line("a")))
    await gateway.run_jobs()
    gateway.events.fail = True
    assert await gateway.services.batches.process_due() == 0
    assert (await client.batches.retrieve(batch.id)).status == "finalizing"
    async with gateway.storage.unit_of_work() as uow:
        files = await uow.repo(StoredFile).count()
    assert files == 1  # only the input: the output file went with the rolled-back unit
    gateway.events.fail = False
    assert await gateway.services.batches.process_due() == 1
    assert (await client.batches.retrieve(batch.id)).status == "completed"


# ---- owner scoping and validation -------------------------------------------------------------


async def test_a_key_sees_only_its_own_files_and_batches(gateway: Gateway) -> None:
    alice = gateway.sdk(await gateway.key())
    bob = gateway.sdk(await gateway.key())
    batch = await start(alice, jsonl(line("a")))
    file_id = batch.input_file_id
    for call in (
        lambda: bob.files.retrieve(file_id),
        lambda: bob.files.content(file_id),
        lambda: bob.files.delete(file_id),
        lambda: bob.batches.retrieve(batch.id),
        lambda: bob.batches.cancel(batch.id),
        lambda: bob.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
        ),
    ):
        with pytest.raises(openai.NotFoundError):
            await call()
    assert [b.id async for b in bob.batches.list()] == []
    assert [f.id async for f in bob.files.list()] == []
    assert [b.id async for b in alice.batches.list()] == [batch.id]


async def test_bad_uploads_and_batch_parameters_are_400s_naming_the_field(
    gateway: Gateway,
) -> None:
    secret = await gateway.key()
    client = gateway.sdk(secret)
    cases: list[tuple[Callable[[], Any], str]] = [
        (
            lambda: client.files.create(file=("a.jsonl", jsonl(line("a"))), purpose="fine-tune"),
            "purpose",
        ),
        (lambda: client.files.create(file=("a.csv", b"a,b\n1,2\n"), purpose="batch"), "file"),
        (lambda: client.files.create(file=("a.bin", b"\xff\xfe{}"), purpose="batch"), "file"),
        (lambda: client.files.retrieve("not-a-file-id"), "file_id"),
    ]
    for call, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            await call()
        assert caught.value.body is not None
        assert caught.value.body["param"] == param  # type: ignore[index]
    file_id = await upload(client, jsonl(line("a")))
    for endpoint, window, param in (
        ("/v1/completions", "24h", "endpoint"),
        ("/v1/chat/completions", "1h", "completion_window"),
    ):
        with pytest.raises(openai.BadRequestError) as caught:
            await client.batches.create(
                input_file_id=file_id,
                endpoint=endpoint,  # type: ignore[arg-type]
                completion_window=window,  # type: ignore[arg-type]
            )
        assert caught.value.body["param"] == param  # type: ignore[index]
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway.app), base_url="http://g")
    async with http:
        missing = await http.post(
            "/v1/files",
            data={"purpose": "batch"},
            headers={"Authorization": f"Bearer {secret}"},
        )
        assert missing.status_code == 400 and missing.json()["error"]["param"] == "file"
        big = b"x" * (gateway.services.settings.FILE_MAX_BYTES + 1)
        too_big = await http.post(
            "/v1/files",
            data={"purpose": "batch"},
            files={"file": ("big.jsonl", big)},
            headers={"Authorization": f"Bearer {secret}"},
        )
        assert too_big.status_code == 400 and too_big.json()["error"]["param"] == "file"


async def test_a_deleted_file_is_gone_but_its_batch_still_runs(gateway: Gateway) -> None:
    client = gateway.sdk(await gateway.key())
    batch = await start(client, jsonl(line("a")))
    deleted = await client.files.delete(batch.input_file_id)
    assert deleted.deleted
    with pytest.raises(openai.NotFoundError):
        await client.files.retrieve(batch.input_file_id)
    await gateway.run_jobs()
    await gateway.services.batches.process_due()
    assert (await client.batches.retrieve(batch.id)).status == "completed"


async def test_an_embeddings_batch_returns_vectors_keyed_by_custom_id(gateway: Gateway) -> None:
    client = gateway.sdk(await gateway.key())

    def embedding_line(custom_id: str, text: str) -> dict[str, Any]:
        body = {"model": "mock-embedding", "input": text}
        return {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings", "body": body}

    content = jsonl(embedding_line("e1", "one"), embedding_line("e2", "two"), line("chat"))
    batch = await client.batches.create(
        input_file_id=await upload(client, content),
        endpoint="/v1/embeddings",
        completion_window="24h",
    )
    await gateway.run_jobs()
    await gateway.services.batches.process_due()
    done = await client.batches.retrieve(batch.id)
    assert done.status == "completed" and done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (2, 1)
    outputs = by_custom_id(await lines_of(client, done.output_file_id))
    vectors = [outputs[c]["response"]["body"]["data"][0]["embedding"] for c in ("e1", "e2")]
    assert all(len(v) > 0 for v in vectors) and vectors[0] != vectors[1]
    (refused,) = await lines_of(client, done.error_file_id)
    assert refused["custom_id"] == "chat" and refused["error"]["code"] == "invalid_url"


@pytest.mark.parametrize(
    ("code", "status"),
    [("upstream_timeout", 504), ("upstream_rate_limited", 429), ("circuit_open", 503)],
)
def test_a_failed_line_carries_the_status_the_api_answers_for_its_error(
    code: str, status: int
) -> None:
    child = Operation(
        id="op_line",
        kind=OperationKind.CHAT_COMPLETION,
        status=OperationStatus.FAILED,
        queue="chat",
        meta={"custom_id": "q1"},
        error_type=code,
        error_message="the upstream gave up",
    )
    line = _failed_line(child, "batch_cancelled")
    assert line["response"]["status_code"] == status
    assert line["response"]["body"]["error"]["code"] == code

"""Ingestion jobs: refusals at submit, waiting, progress, resuming after a crash, failing whole,
cancelling, re-indexing, disabling."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Any

import pytest

from app.config import Settings
from app.knowledge.entities import KnowledgeBase, KnowledgeChunk
from app.models.schemas import ModelCreate, ModelParameters, ModelUpdate
from app.operations.entities import Operation
from app.storage.protocol import Where
from app.usage.entities import UsageRecord, UsageType
from tests.knowledge.conftest import Gateway, knowledge_settings

SENTENCES = " ".join(f"Sentence {i} tells of topic {i}." for i in range(40))
SENTENCE_CHUNKING = {"strategy": "sentence", "chunk_size": 100, "chunk_overlap": 0}
BATCH = 2


@pytest.fixture
def settings() -> Settings:
    return knowledge_settings(
        KNOWLEDGE_EMBED_BATCH=BATCH, KNOWLEDGE_MAX_DOCUMENT_BYTES=4096, KNOWLEDGE_MAX_CHUNKS=50
    )


class Crash(BaseException):
    """The worker dies here (as under kill -9): nothing after it runs, nothing is cleaned up."""


@dataclass
class CrashingJob:
    """A job context whose worker dies at its checkpoint number `after + 1`."""

    operation: Operation
    after: int
    attempt: int = 1
    checkpoints: int = 0
    progress: dict[str, Any] = field(default_factory=dict)

    async def checkpoint(self) -> None:
        self.checkpoints += 1
        if self.checkpoints > self.after:
            raise Crash

    async def set_progress(self, **progress: Any) -> None:
        self.progress.update(progress)


async def _operation(gateway: Gateway, operation_id: str) -> Operation:
    async with gateway.storage.unit_of_work() as uow:
        found = await uow.repo(Operation).get(operation_id)
    assert found is not None
    return found


async def _stored(gateway: Gateway, document_id: str) -> list[int]:
    async with gateway.storage.unit_of_work() as uow:
        chunks = await uow.repo(KnowledgeChunk).find(Where.eq("document_id", document_id))
    return sorted(c.chunk_index for c in chunks.items)


async def _embedding_calls(gateway: Gateway, operation_id: str) -> int:
    async with gateway.storage.unit_of_work() as uow:
        return await uow.repo(UsageRecord).count(
            Where.eq("usage_type", UsageType.EMBEDDING), Where.eq("operation_id", operation_id)
        )


async def _document(gateway: Gateway, document_id: str, base_id: str = "docs") -> dict[str, Any]:
    answer = await gateway.admin.get(f"/admin/knowledge-bases/{base_id}/documents/{document_id}")
    assert answer.status_code == 200, answer.text
    found: dict[str, Any] = answer.json()
    return found


async def _embedding_model(gateway: Gateway, model_id: str, **parameters: Any) -> None:
    await gateway.services.models.create(
        ModelCreate(
            id=model_id,
            kind="embedding",  # type: ignore[arg-type]
            provider="mock",  # type: ignore[arg-type]
            provider_model="mock-embedding",
            parameters=ModelParameters(**parameters),
        )
    )


# ---- refusals at submit ----------------------------------------------------------------------


async def test_a_base_needs_an_existing_embedding_model_and_a_free_id(gateway: Gateway) -> None:
    body = {"id": "docs", "name": "Docs"}
    chat = await gateway.admin.post(
        "/admin/knowledge-bases", json={**body, "embedding_model": "mock"}
    )
    unknown = await gateway.admin.post(
        "/admin/knowledge-bases", json={**body, "embedding_model": "nope"}
    )
    await gateway.base()
    taken = await gateway.admin.post(
        "/admin/knowledge-bases", json={**body, "embedding_model": "mock-embedding"}
    )

    assert chat.status_code == 400 and chat.json()["error"]["param"] == "embedding_model"
    assert "embedding model" in chat.json()["error"]["message"]
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "embedding_model"
    assert taken.status_code == 409


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"content": "x" * 5000}, 413, "content"),
        (
            {"content": "word " * 800, "chunking": {"chunk_size": 50, "chunk_overlap": 0}},
            400,
            "content",
        ),
        ({"content": "text", "parser": "docx"}, 400, "parser"),
        ({"content": "{oops", "parser": "json"}, 400, "content"),
        (
            {"content": "text", "chunking": {"chunk_size": 100, "chunk_overlap": 100}},
            400,
            "chunking",
        ),
        ({"content": "text", "metadata": {"_document_id": "forged"}}, 400, "metadata"),
        ({"content": "text", "surprise": 1}, 400, "surprise"),
    ],
)
async def test_a_document_that_cannot_be_ingested_is_refused_at_once(
    gateway: Gateway, body: dict[str, Any], status: int, param: str
) -> None:
    await gateway.base()
    answer = await gateway.admin.post("/admin/knowledge-bases/docs/documents", json=body)

    assert answer.status_code == status, answer.text
    assert param in (answer.json()["error"]["param"] or ""), answer.json()
    listed = await gateway.admin.get("/admin/knowledge-bases/docs/documents")
    assert listed.json()["data"] == [] and gateway.queue.sent == []


async def test_an_upload_with_one_bad_file_accepts_none_of_them(gateway: Gateway) -> None:
    await gateway.base()
    answer = await gateway.admin.post(
        "/admin/knowledge-bases/docs/documents/upload",
        files=[
            ("files", ("good.txt", b"fine text", "text/plain")),
            ("files", ("bad.json", b"{nope", "application/json")),
        ],
    )

    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "files.1"
    assert "bad.json" in answer.json()["error"]["message"]
    assert (await gateway.admin.get("/admin/knowledge-bases/docs/documents")).json()["data"] == []


async def test_documents_of_an_unknown_base_are_not_found(gateway: Gateway) -> None:
    answer = await gateway.admin.post(
        "/admin/knowledge-bases/none/documents", json={"content": "x"}
    )

    assert answer.status_code == 404


# ---- the job ---------------------------------------------------------------------------------


async def test_wait_answers_once_the_document_is_ingested(gateway: Gateway) -> None:
    await gateway.base()

    async def worker() -> None:
        for _ in range(500):
            if gateway.queue.sent:
                await gateway.run_jobs()
                return
            await asyncio.sleep(0.01)

    running = asyncio.create_task(worker())
    answer = await gateway.admin.post(
        "/admin/knowledge-bases/docs/documents?wait=5", json={"content": SENTENCES}
    )
    await running

    assert answer.status_code == 201, answer.text
    assert answer.json()["status"] == "ready"
    assert answer.json()["chunk_count"] > 0
    assert answer.headers["location"].endswith(answer.json()["id"])


async def test_a_crashed_ingestion_resumes_without_embedding_stored_chunks_again(
    gateway: Gateway,
) -> None:
    await gateway.base()
    accepted = await gateway.document(content=SENTENCES, chunking=SENTENCE_CHUNKING)
    operation = await _operation(gateway, accepted["operation_id"])

    crashed = CrashingJob(operation, after=2)
    with pytest.raises(Crash):
        await gateway.services.knowledge.ingest(crashed)
    total = crashed.progress["chunks_total"]
    assert await _stored(gateway, accepted["id"]) == list(range(2 * BATCH))
    midway = await _document(gateway, accepted["id"])
    assert midway["status"] == "processing"
    # Not searchable until every chunk is in.
    found = await gateway.admin.post("/v1/knowledge-bases/docs/search", json={"query": "topic"})
    assert found.json()["data"] == []

    await gateway.run_jobs()  # the job, recovered, runs again

    assert (await _document(gateway, accepted["id"]))["status"] == "ready"
    assert await _stored(gateway, accepted["id"]) == list(range(total))
    # One call per batch in all: the two batches stored before the crash were not sent again.
    assert await _embedding_calls(gateway, operation.id) == math.ceil(total / BATCH)
    progress = (await _operation(gateway, operation.id)).progress
    assert progress == {"chunks_embedded": total, "chunks_total": total}


async def test_a_document_whose_embeddings_fail_is_failed_with_none_of_its_chunks(
    gateway: Gateway,
) -> None:
    await _embedding_model(gateway, "mock-embed-2")
    await gateway.base(embedding_model="mock-embed-2")
    accepted = await gateway.document(content=SENTENCES, chunking=SENTENCE_CHUNKING)
    operation = await _operation(gateway, accepted["operation_id"])
    with pytest.raises(Crash):
        await gateway.services.knowledge.ingest(CrashingJob(operation, after=2))
    assert await _stored(gateway, accepted["id"]) != []
    # The model now refuses every request: a permanent failure, which no retry can mend.
    await gateway.services.models.update(
        "mock-embed-2",
        ModelUpdate(parameters=ModelParameters(mock_failure_rate=1, mock_failure="permanent")),
    )

    await gateway.run_jobs()

    document = await _document(gateway, accepted["id"])
    assert document["status"] == "failed"
    assert "refused" in document["error"]
    assert document["chunk_count"] == 0
    assert await _stored(gateway, accepted["id"]) == []
    assert (await _operation(gateway, operation.id)).status == "failed"


async def test_cancelling_an_ingestion_stops_it_and_keeps_none_of_its_chunks(
    gateway: Gateway,
) -> None:
    await _embedding_model(gateway, "mock-embed-slow", mock_latency_ms=100)
    await gateway.base(embedding_model="mock-embed-slow")
    accepted = await gateway.document(content=SENTENCES, chunking=SENTENCE_CHUNKING)
    running = asyncio.create_task(gateway.run_jobs())
    for _ in range(200):
        progress = (await _operation(gateway, accepted["operation_id"])).progress
        if progress.get("chunks_embedded", 0) >= BATCH:
            break
        await asyncio.sleep(0.02)

    cancelled = await gateway.admin.delete(f"/v1/operations/{accepted['operation_id']}")
    await running

    assert cancelled.status_code == 200
    document = await _document(gateway, accepted["id"])
    assert document["status"] == "failed" and "cancelled" in document["error"]
    assert await _stored(gateway, accepted["id"]) == []
    calls = await _embedding_calls(gateway, accepted["operation_id"])
    assert calls < progress["chunks_total"] / BATCH  # it stopped early


async def test_a_job_cancelled_before_it_ran_leaves_its_document_failed(gateway: Gateway) -> None:
    await gateway.base()
    accepted = await gateway.document(content="some text")

    await gateway.admin.delete(f"/v1/operations/{accepted['operation_id']}")
    await gateway.run_jobs()

    document = await _document(gateway, accepted["id"])
    assert document["status"] == "failed" and "cancelled" in document["error"]


# ---- re-indexing and disabling ---------------------------------------------------------------


async def test_reindexing_a_document_replaces_its_chunks(gateway: Gateway) -> None:
    await gateway.base()
    accepted = await gateway.document(content=SENTENCES, chunking=SENTENCE_CHUNKING)
    await gateway.run_jobs()
    before = await _stored(gateway, accepted["id"])

    answer = await gateway.admin.post(
        f"/admin/knowledge-bases/docs/documents/{accepted['id']}/reindex",
        json={"chunking": {"strategy": "fixed_size", "chunk_size": 500, "chunk_overlap": 50}},
    )
    assert answer.status_code == 202
    assert answer.json()["status"] == "pending"
    assert answer.json()["operation_id"] != accepted["operation_id"]
    assert await _stored(gateway, accepted["id"]) == []
    await gateway.run_jobs()

    after = await _document(gateway, accepted["id"])
    assert after["status"] == "ready"
    assert 0 < len(await _stored(gateway, accepted["id"])) < len(before)


async def test_reindexing_a_base_with_another_model_embeds_everything_again(
    gateway: Gateway,
) -> None:
    await _embedding_model(gateway, "mock-embed-64", mock_dimensions=64)
    await gateway.base()
    accepted = await gateway.document(content=SENTENCES, chunking=SENTENCE_CHUNKING)
    await gateway.run_jobs()

    answer = await gateway.admin.post(
        "/admin/knowledge-bases/docs/reindex", json={"embedding_model": "mock-embed-64"}
    )
    assert answer.status_code == 202 and len(answer.json()["data"]) == 1
    await gateway.run_jobs()

    base = (await gateway.admin.get("/admin/knowledge-bases/docs")).json()
    assert (base["embedding_model"], base["embedding_dimensions"]) == ("mock-embed-64", 64)
    async with gateway.storage.unit_of_work() as uow:
        chunk = (
            await uow.repo(KnowledgeChunk).find(Where.eq("document_id", accepted["id"]))
        ).items[0]
        stored_base = await uow.repo(KnowledgeBase).get("docs")
    assert len(chunk.embedding) == 4 * 64 and stored_base is not None
    found = await gateway.admin.post(
        "/v1/knowledge-bases/docs/search", json={"query": chunk.content}
    )
    assert found.json()["model"] == "mock-embed-64"
    assert found.json()["data"][0]["chunk_id"] == chunk.id
    assert found.json()["data"][0]["score"] == pytest.approx(1.0, abs=1e-5)


async def test_a_disabled_document_is_left_out_of_searches_until_enabled(gateway: Gateway) -> None:
    await gateway.base()
    accepted = await gateway.document(content="penguins swim in cold water")
    await gateway.run_jobs()

    async def titles() -> int:
        answer = await gateway.admin.post(
            "/v1/knowledge-bases/docs/search", json={"query": "penguins"}
        )
        return len(answer.json()["data"])

    assert await titles() == 1
    disabled = await gateway.admin.post(
        f"/admin/knowledge-bases/docs/documents/{accepted['id']}/disable"
    )
    assert disabled.json() == {
        "id": accepted["id"],
        "object": "knowledge_base.document",
        "knowledge_base_id": "docs",
        "disabled": True,
    }
    assert await titles() == 0
    await gateway.admin.post(f"/admin/knowledge-bases/docs/documents/{accepted['id']}/enable")
    assert await titles() == 1


async def test_deleting_a_base_removes_its_documents_and_chunks(gateway: Gateway) -> None:
    await gateway.base()
    accepted = await gateway.document(content="penguins swim in cold water")
    await gateway.run_jobs()

    deleted = await gateway.admin.delete("/admin/knowledge-bases/docs")

    assert deleted.status_code == 200
    assert await _stored(gateway, accepted["id"]) == []
    assert (await gateway.admin.get("/admin/knowledge-bases/docs")).status_code == 404


async def test_a_job_whose_document_was_reindexed_meanwhile_stands_down(gateway: Gateway) -> None:
    await gateway.base()
    first = await gateway.document(content=SENTENCES, chunking=SENTENCE_CHUNKING)
    again = await gateway.admin.post(f"/admin/knowledge-bases/docs/documents/{first['id']}/reindex")

    await gateway.run_jobs()

    old = await _operation(gateway, first["operation_id"])
    assert old.status == "completed" and old.result["skipped"] == "superseded"
    document = await _document(gateway, first["id"])
    assert document["status"] == "ready"
    assert document["operation_id"] == again.json()["operation_id"]
    assert await _embedding_calls(gateway, old.id) == 0

"""Ingestion with real processes: workers on real Redis and PostgreSQL, one killed mid-document."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest
import redis

from app.config import Settings
from app.core.redis import build_redis
from app.credentials.entities import Provider
from app.knowledge.schemas import KnowledgeBaseCreate
from app.knowledge.service import Upload
from app.models.entities import ModelKind
from app.operations.submit import Owner
from app.queue.broker import build_broker
from app.queue.port import build_queue
from app.services import Services, build_services
from app.storage.sql import SqlStorage, make_database
from tests.conftest import truncate_all
from tests.gateway.conftest import UPSTREAM_SECRET, store_models
from tests.gateway.upstream import FakeUpstream, UpstreamThread
from tests.processes import ADMIN_KEY, Processes, env_for, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

BATCH = 5
SENTENCES = 600  # a chunk each, or two: over 100 embedding calls of 50 ms


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    thread = UpstreamThread()
    served = thread.start()
    yield served
    thread.stop()


def worker_env(database_url: str, redis_url: str) -> dict[str, str]:
    return env_for(
        database_url,
        redis_url,
        KNOWLEDGE_EMBED_BATCH=str(BATCH),
        OUTBOUND_ALLOWED_HOSTS="127.0.0.1",
        GATEWAY_TEST_UPSTREAM_KEY=UPSTREAM_SECRET,
    )


@pytest.fixture
async def services(
    database_url: str, redis_url: str, upstream: FakeUpstream
) -> AsyncIterator[Services]:
    truncate_all(database_url)
    redis.Redis.from_url(redis_url).flushdb()
    settings = Settings(**{**worker_env(database_url, redis_url), "PROCESS_ROLE": "api"})  # type: ignore[arg-type]
    storage = SqlStorage(make_database(database_url))
    queue = build_queue(settings, build_broker(settings))
    built = build_services(settings, storage, queue, build_redis(settings))
    await built.keys.ensure_key(key_id="admin", name="admin", secret=ADMIN_KEY, admin=True)
    await store_models(storage, upstream, ("embed", Provider.OPENAI, {}), kind=ModelKind.EMBEDDING)
    yield built
    await built.aclose()
    await queue.aclose()
    await storage.close()


def stored_chunks(database_url: str, document_id: str) -> list[tuple[int, str]]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT chunk_index, content FROM knowledge_base_chunks WHERE document_id = %s",
            (document_id,),
        ).fetchall()
    return [(index, content) for index, content in rows]


def document_status(database_url: str, document_id: str) -> str:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT status FROM knowledge_base_documents WHERE id = %s", (document_id,)
        ).fetchone()
    return str(row[0]) if row else "missing"


def lease_owner(database_url: str, operation_id: str) -> str | None:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT lease_owner FROM operations WHERE id = %s AND status = 'running'",
            (operation_id,),
        ).fetchone()
    return str(row[0]) if row and row[0] else None


async def test_a_worker_killed_mid_ingestion_is_recovered_and_embeds_each_chunk_once(
    database_url: str,
    redis_url: str,
    services: Services,
    upstream: FakeUpstream,
    processes: Processes,
) -> None:
    upstream.delays["up-embed"] = 0.05
    env = worker_env(database_url, redis_url)
    for _ in range(2):
        processes.start(["worker", "--processes", "1", "--threads", "2"], env)
    await services.knowledge.create_base(
        KnowledgeBaseCreate(
            id="big",
            name="big",
            embedding_model="embed",
            chunking={"strategy": "sentence", "chunk_size": 60, "chunk_overlap": 0},  # type: ignore[arg-type]
        )
    )
    text = " ".join(f"Sentence number {i} is unique." for i in range(SENTENCES))
    (accepted,) = await services.knowledge.add_documents(
        "big", [Upload(content=text.encode(), title="big")], owner=Owner(key_id="admin")
    )
    document_id, operation_id = accepted.document.id, accepted.operation.id

    await asyncio.to_thread(
        wait_until, lambda: len(stored_chunks(database_url, document_id)) >= 100, 60, 0.02
    )
    owner = lease_owner(database_url, operation_id)
    assert owner is not None
    os.kill(int(owner.rsplit("-", 1)[1]), signal.SIGKILL)
    killed_at = time.monotonic()
    before_kill = dict(stored_chunks(database_url, document_id))
    assert document_status(database_url, document_id) == "processing", "it ended before the kill"

    await asyncio.to_thread(
        wait_until, lambda: document_status(database_url, document_id) == "ready", 90, 0.1
    )
    recovery = time.monotonic() - killed_at

    stored = stored_chunks(database_url, document_id)
    total = (await services.knowledge.get_document("big", document_id)).chunk_count
    assert total > len(before_kill)
    assert sorted(index for index, _ in stored) == list(range(total))
    sent = Counter(
        text for seen in upstream.seen if seen.model == "up-embed" for text in seen.body["input"]
    )
    # Every chunk was embedded; none stored before the kill was embedded again, and at most the
    # one batch in flight at the kill was sent twice.
    assert set(sent) == {content for _, content in stored}
    assert all(sent[content] == 1 for content in before_kill.values())
    assert sum(sent.values()) - total <= BATCH
    with psycopg.connect(database_url) as conn:
        (log,) = conn.execute(
            "SELECT attempt_log FROM operations WHERE id = %s", (operation_id,)
        ).fetchone()  # type: ignore[misc]
    outcomes = [entry["outcome"] for entry in log]
    assert outcomes[-1] == "completed" and "lost" in outcomes
    assert recovery < 60, f"took {recovery:.1f} s after the kill"

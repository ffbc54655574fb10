"""Knowledge bases: ingestion throughput, and search latency on the in-process matrix.

Run `python -m bench.knowledge` (`--help` lists the knobs). For each backend (memory,
PostgreSQL in a database of its own, created, migrated and dropped):

- **ingestion**: documents submitted through `KnowledgeService.add_documents` and ingested
  by their jobs (parse, chunk, embed through the gateway's call path with the built-in mock
  model at 384 dimensions, store), in chunks per second;
- **search**: bases of 10k and 100k chunks of 384-dimensional vectors (filled
  directly, as ingestion would have left them), then the snapshot's load time, its memory,
  and p50/p99 of `MatrixIndex.search` (exact cosine, top 10), filtered and not, of the BM25
  keyword search, of the whole `KnowledgeService.search` (query embedded by the mock), and,
  with the `approximate` extra, of the HNSW graph with its recall@10 against exact. The vectors
  cluster around random topics, as embeddings of real text do (uniformly random vectors in 384
  dimensions are all about equally far apart, and no graph finds their neighbours).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import statistics
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

from app.access.service import Principal
from app.config import Settings
from app.core.redis import build_redis
from app.gateway.chat import ensure_builtin_models
from app.knowledge.entities import DocumentStatus, KnowledgeBase, KnowledgeChunk, KnowledgeDocument
from app.knowledge.filters import parse_filter
from app.knowledge.index import MatrixIndex, pack
from app.knowledge.schemas import KnowledgeBaseCreate, SearchMode, SearchRequest
from app.knowledge.service import Upload
from app.models.schemas import ModelCreate, ModelParameters
from app.operations.runner import OperationRunner
from app.operations.submit import Owner
from app.queue.names import OperationKind
from app.services import Services, build_handlers, build_services
from app.storage.memory import MemoryStorage
from app.storage.migrate import upgrade_to_head
from app.storage.protocol import Storage
from app.storage.sql import SqlStorage, make_database

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/gateway_bench_knowledge"
DIMENSIONS = 384
SIZES = (10_000, 100_000)
PER_DOCUMENT = 1000
WORDS = tuple(
    [
        "gateway",
        "queue",
        "worker",
        "lease",
        "retry",
        "budget",
        "token",
        "model",
        "provider",
        "route",
        "cache",
        "stream",
        "chunk",
        "embedding",
        "vector",
        "search",
        "filter",
        "document",
        "section",
        "heading",
        "page",
        "row",
        "metadata",
        "score",
    ]
)


class Queue:
    """A queue that keeps what is sent, for the bench to run in-process."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send(self, operation_id: str, kind: OperationKind, *, delay: float = 0.0) -> None:
        self.sent.append(operation_id)

    async def aclose(self) -> None:
        return None


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p50 = statistics.median(ordered)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return p50 * 1000, p99 * 1000


async def timed(call: Callable[[], Awaitable[Any]], count: int) -> tuple[float, float]:
    await call()  # warm: snapshot, mask, keyword statistics
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - started)
    return percentiles(samples)


def text_of(rng: np.random.Generator, words: int) -> str:
    return " ".join(rng.choice(WORDS, size=words)) + "."


async def services_on(storage: Storage) -> Services:
    settings = Settings(BROKER="stub", SECRET_KEY="bench-knowledge", KNOWLEDGE_MAX_CHUNKS=100_000)
    services = build_services(settings, storage, Queue(), build_redis(settings))
    await ensure_builtin_models(storage)
    await services.models.create(
        ModelCreate(
            id="bench-embedding",
            kind="embedding",
            provider="mock",
            provider_model="mock-embedding",
            parameters=ModelParameters(mock_dimensions=DIMENSIONS),
        )
    )
    return services


async def bench_ingestion(services: Services, chunks: int, seed: int) -> str:
    """Documents of PER_DOCUMENT chunks of about 500 characters each, ingested by their jobs."""
    rng = np.random.default_rng(seed)
    base = await services.knowledge.create_base(
        KnowledgeBaseCreate(
            id=f"ingest-{chunks}",
            name="ingestion",
            embedding_model="bench-embedding",
            chunking={"strategy": "paragraph", "chunk_size": 600, "chunk_overlap": 0},
        )
    )
    documents = max(1, chunks // PER_DOCUMENT)
    uploads = [
        Upload(
            content="\n\n".join(text_of(rng, 70) for _ in range(PER_DOCUMENT)).encode(),
            title=f"doc {i}",
        )
        for i in range(documents)
    ]
    queue = services.queue
    assert isinstance(queue, Queue)
    runner = OperationRunner(services.storage, queue, build_handlers(services))
    started = time.perf_counter()
    for upload in uploads:
        await services.knowledge.add_documents(base.id, [upload], owner=Owner(key_id=None))
    while queue.sent:
        await runner.execute(queue.sent.pop(0))
    elapsed = time.perf_counter() - started
    stored = (await services.knowledge.get_base(base.id)).index_version
    assert stored == documents, f"{stored} of {documents} documents ingested"
    total = documents * PER_DOCUMENT
    return f"{total:>7,} chunks in {elapsed:6.1f} s: {total / elapsed:7,.0f} chunks/s"


# Embeddings of real text cluster by topic; vectors drawn at random in 384 dimensions are all
# about equally far apart, which no approximate index can search well.
TOPICS = np.random.default_rng(0).standard_normal((500, DIMENSIONS), dtype=np.float32)


def clustered(rng: np.random.Generator, count: int) -> Any:
    """`count` vectors near random topics (a topic plus noise of about half its length)."""
    topics = TOPICS[rng.integers(0, len(TOPICS), size=count)]
    return topics + 0.6 * rng.standard_normal((count, DIMENSIONS), dtype=np.float32)


async def fill(storage: Storage, base_id: str, chunks: int, seed: int) -> None:
    """A ready base of `chunks` chunks with random vectors, as ingestion leaves one."""
    rng = np.random.default_rng(seed)
    async with storage.unit_of_work() as uow:
        await uow.repo(KnowledgeBase).add(
            KnowledgeBase(
                id=base_id,
                name=base_id,
                embedding_model_id="bench-embedding",
                embedding_dimensions=DIMENSIONS,
                config={"request_dimensions": True},
                index_version=1,
            )
        )
        await uow.commit()
    for first in range(0, chunks, PER_DOCUMENT):
        document_id = f"{base_id}-doc-{first // PER_DOCUMENT:05d}"
        vectors = clustered(rng, PER_DOCUMENT)
        async with storage.unit_of_work() as uow:
            await uow.repo(KnowledgeDocument).add(
                KnowledgeDocument(
                    id=document_id,
                    knowledge_base_id=base_id,
                    title=document_id,
                    status=DocumentStatus.READY,
                    chunk_count=PER_DOCUMENT,
                    meta={"group": (first // PER_DOCUMENT) % 10},
                )
            )
            await uow.repo(KnowledgeChunk).add_many(
                [
                    KnowledgeChunk(
                        id=f"{document_id}-{i:06d}",
                        document_id=document_id,
                        knowledge_base_id=base_id,
                        chunk_index=i,
                        content=text_of(rng, 60),
                        embedding=pack(vectors[i]),
                        meta={"start": 0, "end": 0, "headings": [], "metadata": {}},
                    )
                    for i in range(PER_DOCUMENT)
                ]
            )
            await uow.commit()


async def bench_search(services: Services, chunks: int, queries: int, seed: int) -> list[str]:
    storage = services.storage
    base_id = f"search-{chunks}"
    await fill(storage, base_id, chunks, seed)
    async with storage.unit_of_work() as uow:
        base = await uow.repo(KnowledgeBase).get(base_id)
    assert base is not None
    index = MatrixIndex(storage)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    started = time.perf_counter()
    snapshot = await index.snapshot(base)
    loaded = time.perf_counter() - started
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    rng = np.random.default_rng(seed + 1)
    vectors = list(clustered(rng, 16))
    turn = iter(range(1 << 30))

    def query() -> list[float]:
        return list(vectors[next(turn) % len(vectors)])

    where = parse_filter({"field": "group", "op": "in", "value": [1, 2]})
    plain = await timed(lambda: index.search(base, query(), top_k=10), queries)
    filtered = await timed(lambda: index.search(base, query(), top_k=10, where=where), queries)
    keyword_built = time.perf_counter()
    await index.keyword_search(base, "gateway lease", top_k=10)
    keyword_build = time.perf_counter() - keyword_built
    keyword = await timed(
        lambda: index.keyword_search(base, "retry budget token", top_k=10), queries
    )
    approximate = await bench_hnsw(index, base, vectors, queries)
    # The whole search as a client gets it: the query embedded (mock), hits read back.
    services.knowledge.index = index
    caller = Principal(key_id="bench", team_id=None, admin=True)
    request = SearchRequest(query="lease retry worker", top_k=10, mode=SearchMode.VECTOR)
    full = await timed(lambda: services.knowledge.search(caller, base_id, request), queries)
    return [
        f"{chunks:>7,} chunks: snapshot load {loaded:6.2f} s, held {held / 1e6:6.1f} MB "
        f"(matrix {snapshot.matrix.nbytes / 1e6:.1f} MB)",
        f"{'':>16}exact top-10      p50 {plain[0]:6.2f} ms  p99 {plain[1]:6.2f} ms",
        f"{'':>16}filtered top-10   p50 {filtered[0]:6.2f} ms  p99 {filtered[1]:6.2f} ms",
        f"{'':>16}keyword top-10    p50 {keyword[0]:6.2f} ms  p99 {keyword[1]:6.2f} ms "
        f"(statistics built in {keyword_build:.2f} s)",
        f"{'':>16}service search    p50 {full[0]:6.2f} ms  p99 {full[1]:6.2f} ms "
        "(embedding the query, reading the hits)",
        *approximate,
    ]


async def bench_hnsw(
    index: MatrixIndex, base: KnowledgeBase, vectors: list[Any], queries: int
) -> list[str]:
    """The HNSW graph over the same snapshot: build time, recall@10 against exact, latency."""
    try:
        from app.knowledge.approximate import HnswIndex
    except ImportError:
        return [f"{'':>16}hnsw: not installed (the approximate extra)"]
    graph = HnswIndex(index, min_chunks=1)
    started = time.perf_counter()
    await graph.ready(base)
    built = time.perf_counter() - started
    found = 0
    for vector in vectors:
        truth = {h.chunk_id for h in await index.search(base, list(vector), top_k=10)}
        found += len(truth & {h.chunk_id for h in await graph.search(base, list(vector), top_k=10)})
    recall = found / (10 * len(vectors))
    turn = iter(range(1 << 30))
    latency = await timed(
        lambda: graph.search(base, list(vectors[next(turn) % len(vectors)]), top_k=10), queries
    )
    return [
        f"{'':>16}hnsw top-10       p50 {latency[0]:6.2f} ms  p99 {latency[1]:6.2f} ms "
        f"(recall@10 {recall:.3f} against exact, built in {built:.1f} s)"
    ]


async def bench_backend(name: str, storage: Storage, args: argparse.Namespace) -> list[str]:
    services = await services_on(storage)
    lines = [f"== {name}"]
    try:
        for chunks in args.ingest:
            lines.append("ingestion " + await bench_ingestion(services, chunks, args.seed))
            print(lines[-1], flush=True)
        for chunks in args.sizes:
            lines += await bench_search(services, chunks, args.queries, args.seed)
            print("\n".join(lines[-6:]), flush=True)
    finally:
        await services.aclose()
        await storage.close()
    return lines


def _admin(url: str) -> tuple[str, str]:
    base, _, name = url.rpartition("/")
    return f"{base}/postgres", name.split("?")[0]


def recreate_database(url: str) -> None:
    admin, name = _admin(url)
    with psycopg.connect(admin, autocommit=True, connect_timeout=3) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def drop_database(url: str) -> None:
    admin, name = _admin(url)
    with psycopg.connect(admin, autocommit=True, connect_timeout=3) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", default=["memory", "postgres"])
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL)
    parser.add_argument("--sizes", nargs="+", type=int, default=list(SIZES))
    parser.add_argument(
        "--ingest", nargs="*", type=int, default=[10_000], help="chunks ingested by jobs"
    )
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--seed", type=int, default=7)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    print(
        f"dimensions={DIMENSIONS}, queries={args.queries}, python {platform.python_version()}, "
        f"numpy {np.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, "
        f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}"
    )
    for backend in args.backends:
        if backend == "memory":
            asyncio.run(bench_backend("memory", MemoryStorage(), args))
            continue
        try:
            recreate_database(args.database_url)
        except psycopg.OperationalError as exc:
            print(f"PostgreSQL is not reachable for {args.database_url}: {exc}", file=sys.stderr)
            return 1
        try:
            upgrade_to_head(args.database_url)
            storage = SqlStorage(make_database(args.database_url))
            asyncio.run(bench_backend("postgres", storage, args))
        finally:
            drop_database(args.database_url)
    return 0


if __name__ == "__main__":
    sys.exit(main())

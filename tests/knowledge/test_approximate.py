"""The approximate (HNSW) index: it answers from its graph once built, the exact index before
and for rare filters, with the exact index's scores."""

from __future__ import annotations

import numpy as np
import pytest

from app.knowledge.approximate import HnswIndex
from app.knowledge.entities import DocumentStatus, KnowledgeBase, KnowledgeChunk, KnowledgeDocument
from app.knowledge.filters import parse_filter
from app.knowledge.index import MatrixIndex, pack
from app.storage.protocol import Storage

DIMENSIONS = 32
DOCUMENTS = 20
PER_DOCUMENT = 50


async def _filled(storage: Storage) -> KnowledgeBase:
    rng = np.random.default_rng(3)
    base = KnowledgeBase(id="big", name="big", embedding_dimensions=DIMENSIONS, index_version=1)
    async with storage.unit_of_work() as uow:
        await uow.repo(KnowledgeBase).add(base)
        for d in range(DOCUMENTS):
            document_id = f"doc-{d:03d}"
            await uow.repo(KnowledgeDocument).add(
                KnowledgeDocument(
                    id=document_id,
                    knowledge_base_id="big",
                    title=document_id,
                    status=DocumentStatus.READY,
                    meta={"group": d % 20},
                )
            )
            vectors = rng.standard_normal((PER_DOCUMENT, DIMENSIONS), dtype=np.float32)
            await uow.repo(KnowledgeChunk).add_many(
                [
                    KnowledgeChunk(
                        id=f"{document_id}-{i:06d}",
                        document_id=document_id,
                        knowledge_base_id="big",
                        chunk_index=i,
                        content=f"chunk {i}",
                        embedding=pack(vectors[i]),
                    )
                    for i in range(PER_DOCUMENT)
                ]
            )
        await uow.commit()
    return base


async def test_the_graph_finds_what_the_exact_search_finds_with_the_same_scores(
    storage: Storage,
) -> None:
    base = await _filled(storage)
    exact = MatrixIndex(storage)
    approximate = HnswIndex(MatrixIndex(storage), min_chunks=100)
    await approximate.ready(base)
    rng = np.random.default_rng(5)
    found = 0
    for _ in range(20):
        query = list(rng.standard_normal(DIMENSIONS))
        truth = await exact.search(base, query, top_k=10)
        hits = await approximate.search(base, query, top_k=10)
        scores = {h.chunk_id: h.score for h in truth}
        found += len(scores.keys() & {h.chunk_id for h in hits})
        for hit in hits:
            if hit.chunk_id in scores:
                assert hit.score == pytest.approx(scores[hit.chunk_id], abs=1e-4)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert found / 200 >= 0.9  # recall@10 on a thousand chunks


async def test_small_bases_and_rare_filters_are_answered_exactly(storage: Storage) -> None:
    base = await _filled(storage)
    exact = MatrixIndex(storage)
    query = list(np.random.default_rng(9).standard_normal(DIMENSIONS))
    small = HnswIndex(MatrixIndex(storage), min_chunks=10_000)
    rare = parse_filter({"field": "group", "op": "eq", "value": 7})  # a twentieth of the base
    graph = HnswIndex(MatrixIndex(storage), min_chunks=100)
    await graph.ready(base)

    assert await small.search(base, query, top_k=5) == await exact.search(base, query, top_k=5)
    assert await graph.search(base, query, top_k=5, where=rare) == await exact.search(
        base, query, top_k=5, where=rare
    )

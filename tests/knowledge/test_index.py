"""The exact index: snapshots follow the base's index version, reuse what did not change, and
order ties the same way on every backend."""

from __future__ import annotations

import asyncio

import pytest

from app.knowledge.entities import KnowledgeBase
from app.knowledge.index import MatrixIndex
from tests.knowledge.conftest import Gateway


async def _base(gateway: Gateway) -> KnowledgeBase:
    return await gateway.services.knowledge.get_base("docs")


async def test_a_new_snapshot_reads_only_the_documents_that_changed(gateway: Gateway) -> None:
    await gateway.base()
    for title in ("one", "two"):
        await gateway.document(content=f"text of document {title}", title=title)
    await gateway.run_jobs()
    index = MatrixIndex(gateway.storage)
    first = await index.snapshot(await _base(gateway))
    assert first.size == 2

    await gateway.document(content="text of document three", title="three")
    await gateway.run_jobs()
    second = await index.snapshot(await _base(gateway))

    assert second.version > first.version and second.size == 3
    for document_id, part in first.parts.items():
        assert second.parts[document_id].views is part.views  # kept, not read again
    assert await index.snapshot(await _base(gateway)) is second  # same version: same snapshot


async def test_a_change_announced_refreshes_the_held_snapshot_before_any_search(
    gateway: Gateway,
) -> None:
    await gateway.base()
    await gateway.document(content="penguins swim", title="one")
    await gateway.run_jobs()
    index = MatrixIndex(gateway.storage)
    first = await index.snapshot(await _base(gateway))
    await gateway.document(content="penguins dive", title="two")
    await gateway.run_jobs()

    index.changed("docs")
    for _ in range(100):
        held = index.held("docs")
        if held is not None and held is not first:
            break
        await asyncio.sleep(0.01)

    assert held is not None and held.size == 2
    assert held.version == (await _base(gateway)).index_version
    await gateway.admin.delete("/admin/knowledge-bases/docs")
    index.changed("docs")
    for _ in range(100):
        if index.held("docs") is None:
            break
        await asyncio.sleep(0.01)
    assert index.held("docs") is None  # a deleted base's matrix is freed


async def test_equal_scores_are_ordered_by_document_then_chunk(gateway: Gateway) -> None:
    await gateway.base()
    text = "the very same words, said again"
    for _ in range(3):
        await gateway.document(
            content=f"{text}\n\n{text}",
            chunking={"strategy": "paragraph", "chunk_size": 50, "chunk_overlap": 0},
        )
    await gateway.run_jobs()

    hits = await MatrixIndex(gateway.storage).search(
        await _base(gateway), _vector(gateway, text), top_k=10
    )

    assert len(hits) == 6
    assert [h.chunk_id for h in hits] == sorted(h.chunk_id for h in hits)
    assert all(h.score == pytest.approx(1.0, abs=1e-5) for h in hits)


def _vector(gateway: Gateway, text: str) -> list[float]:
    from app.gateway.providers.mock import DEFAULT_DIMENSIONS, embed_text

    return embed_text(text, DEFAULT_DIMENSIONS)

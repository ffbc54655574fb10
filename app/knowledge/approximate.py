"""An approximate index for large bases: an HNSW graph (usearch, the `approximate` extra) over
the exact index's snapshot, built on a thread once per snapshot.

It answers from the graph only where that is both possible and worth it: for a base of at least
`min_chunks` chunks, once its graph is built (the exact search answers meanwhile), and for a
filter that keeps at least a tenth of the chunks (a rarer one is answered exactly, since a
graph walk would have to visit most of the base to find enough of them). Scores are the same
cosine similarities as the exact search's; only which chunks are found may differ.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from app.knowledge.entities import KnowledgeBase
from app.knowledge.filters import Filter
from app.knowledge.index import Hit, MatrixIndex, Snapshot

log = logging.getLogger(__name__)

MIN_CHUNKS = 50_000
CONNECTIVITY = 16
EXPANSION_ADD = 64
EXPANSION_SEARCH = 96
# A filtered search asks the graph for this many times more neighbours, then filters them.
OVERSAMPLE = 8
RARE_FILTER = 0.1


class HnswIndex:
    """`SearchIndex` answering large bases from an HNSW graph, the rest from `exact`."""

    def __init__(
        self,
        exact: MatrixIndex,
        *,
        min_chunks: int = MIN_CHUNKS,
        expansion_search: int = EXPANSION_SEARCH,
    ) -> None:
        from usearch.index import Index  # the `approximate` extra; imported only when chosen

        self._new_index = Index
        self.exact = exact
        self.min_chunks = min_chunks
        self.expansion_search = expansion_search
        self._graphs: dict[str, tuple[int, Any]] = {}
        self._building: dict[tuple[str, int], asyncio.Task[None]] = {}

    def changed(self, base_id: str) -> None:
        # The exact snapshot is refreshed; the graph of the new one is built on its first search.
        self.exact.changed(base_id)

    async def keyword_search(
        self, base: KnowledgeBase, text: str, *, top_k: int, where: Filter | None = None
    ) -> list[Hit]:
        return await self.exact.keyword_search(base, text, top_k=top_k, where=where)

    def graph(self, snapshot: Snapshot) -> Any | None:
        """The snapshot's graph when built; starts building it (on a thread) when not."""
        held = self._graphs.get(snapshot.base_id)
        if held is not None and held[0] == snapshot.version:
            return held[1]
        key = (snapshot.base_id, snapshot.version)
        if key not in self._building:
            task = asyncio.create_task(self._build(snapshot))
            self._building[key] = task
            task.add_done_callback(lambda _: self._building.pop(key, None))
        return None

    async def ready(self, base: KnowledgeBase) -> None:
        """Wait until the base's graph at its current snapshot is built (benchmarks, tests)."""
        snapshot = await self.exact.snapshot(base)
        if snapshot.size < self.min_chunks or self.graph(snapshot) is not None:
            return
        await self._building[(snapshot.base_id, snapshot.version)]

    async def _build(self, snapshot: Snapshot) -> None:
        def build() -> Any:
            index = self._new_index(
                ndim=snapshot.dimensions,
                metric="cos",
                dtype="f32",
                connectivity=CONNECTIVITY,
                expansion_add=EXPANSION_ADD,
                expansion_search=self.expansion_search,
            )
            index.add(np.arange(snapshot.size, dtype=np.uint64), snapshot.matrix)
            return index

        try:
            built = await asyncio.to_thread(build)
        except Exception:
            log.exception("the HNSW graph of knowledge base %s was not built", snapshot.base_id)
            return
        held = self._graphs.get(snapshot.base_id)
        if held is None or held[0] < snapshot.version:
            self._graphs[snapshot.base_id] = (snapshot.version, built)

    async def search(
        self,
        base: KnowledgeBase,
        vector: Sequence[float],
        *,
        top_k: int,
        min_score: float | None = None,
        where: Filter | None = None,
    ) -> list[Hit]:
        snapshot = await self.exact.snapshot(base)
        graph = self.graph(snapshot) if snapshot.size >= self.min_chunks else None
        mask = snapshot.mask(where) if where is not None and graph is not None else None
        if graph is None or (mask is not None and mask.mean() < RARE_FILTER):
            return await self.exact.search(
                base, vector, top_k=top_k, min_score=min_score, where=where
            )
        query = np.asarray(vector, dtype=np.float32)
        if query.shape != (snapshot.dimensions,) or not np.any(query):
            return []
        wanted = min(snapshot.size, top_k * (OVERSAMPLE if mask is not None else 1))
        found = await asyncio.to_thread(graph.search, query, wanted)
        hits: list[Hit] = []
        ranked = sorted(
            zip(found.keys.tolist(), found.distances.tolist(), strict=True),
            key=lambda pair: (pair[1], pair[0]),
        )
        for row, distance in ranked:
            if mask is not None and not mask[row]:
                continue
            score = 1.0 - float(distance)
            if min_score is not None and score < min_score:
                break
            hits.append(Hit(snapshot.chunk_ids[row], score))
            if len(hits) == top_k:
                break
        return hits

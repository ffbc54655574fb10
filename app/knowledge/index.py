"""Searching a knowledge base's chunks: the protocol a search backend implements, and the exact
one every install has, over a per-base matrix held in the process.

`MatrixIndex` reads a base's searchable chunks (those of its ready, enabled documents) through
the storage protocol, so it answers alike on PostgreSQL and in memory. A snapshot is tagged
with the base's `index_version`, which every change of its searchable chunks steps in the same
transaction: a search that finds the base at a newer step loads again (only the documents that
changed), and a change announced on the invalidation bus has every process that holds the base
refresh it in the background, so that searches seldom wait. pgvector or Qdrant would
implement the same protocols with their own storage and pass the same contract tests.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from app.core.invalidation import ALL
from app.knowledge.entities import DocumentStatus, KnowledgeBase, KnowledgeChunk, KnowledgeDocument
from app.knowledge.filters import ChunkView, Filter
from app.storage.protocol import Storage, Where

log = logging.getLogger(__name__)

# Rows per read while building keyword statistics.
LOAD_PAGE = 2000
# Matrices this large are multiplied on a thread, so the event loop goes on meanwhile.
THREAD_ROWS = 20_000
MASKS_KEPT = 32
# BM25's usual constants.
BM25_K1 = 1.2
BM25_B = 0.75
_TOKEN = re.compile(r"\w+", re.UNICODE)

Matrix = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class Hit:
    """A chunk found, with its score (cosine similarity, or the keyword score)."""

    chunk_id: str
    score: float


class VectorIndex(Protocol):
    """Nearest chunks to a query vector among a base's searchable chunks."""

    async def search(
        self,
        base: KnowledgeBase,
        vector: Sequence[float],
        *,
        top_k: int,
        min_score: float | None = None,
        where: Filter | None = None,
    ) -> list[Hit]:
        """The `top_k` best chunks by cosine similarity, best first, those below `min_score`
        and those `where` excludes left out; ties by document id, then chunk index."""
        ...

    def changed(self, base_id: str) -> None:
        """The base's chunks changed, perhaps in another process (`ALL`: any base may have):
        bring what this process holds of it up to date, or drop it."""
        ...


class KeywordIndex(Protocol):
    """Chunks ranked by how well their words match the query's (BM25)."""

    async def keyword_search(
        self, base: KnowledgeBase, text: str, *, top_k: int, where: Filter | None = None
    ) -> list[Hit]:
        """The `top_k` best chunks by BM25 score (only those sharing a word with `text`)."""
        ...


class SearchIndex(VectorIndex, KeywordIndex, Protocol):
    """Both kinds of search over one base."""


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def pack(vector: Sequence[float]) -> bytes:
    """A vector as stored in a chunk row: little-endian float32."""
    return np.asarray(vector, dtype="<f4").tobytes()


def unpack(data: bytes) -> Matrix:
    return np.frombuffer(data, dtype="<f4")


@dataclass
class _Keywords:
    """BM25 statistics of a snapshot's chunks: a posting list per term."""

    postings: dict[str, tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]]
    lengths: npt.NDArray[np.float32]
    average: float


@dataclass(frozen=True, slots=True)
class _Part:
    """One document's rows of a snapshot (from `start`), reused by the next snapshot while the
    document row stays at `version`."""

    version: int
    start: int
    chunk_ids: list[str]
    views: list[ChunkView]


@dataclass
class Snapshot:
    """A base's searchable chunks as of one `index_version`: unit vectors ordered by document
    id, then chunk index (the same order on every backend)."""

    base_id: str
    version: int
    dimensions: int
    matrix: Matrix
    chunk_ids: list[str]
    views: list[ChunkView]
    parts: dict[str, _Part] = field(default_factory=dict)
    masks: dict[str, npt.NDArray[np.bool_]] = field(default_factory=dict)
    keywords: _Keywords | None = None

    @property
    def size(self) -> int:
        return len(self.chunk_ids)

    def mask(self, where: Filter) -> npt.NDArray[np.bool_]:
        """Which chunks `where` keeps (kept for the next search with the same filter)."""
        found = self.masks.get(where.canonical)
        if found is None:
            found = np.fromiter((where.matches(v) for v in self.views), bool, self.size)
            if len(self.masks) >= MASKS_KEPT:
                self.masks.pop(next(iter(self.masks)))
            self.masks[where.canonical] = found
        return found


def _best(scores: npt.NDArray[np.float32], top_k: int, floor: float) -> list[tuple[int, float]]:
    """Positions of the `top_k` highest scores at or above `floor`, best first, ties by
    position (the snapshot's order, the same on every backend)."""
    eligible = int(np.count_nonzero(scores >= floor))
    k = min(top_k, eligible)
    if k <= 0:
        return []
    if k < scores.size:
        # The k-th best score: everything strictly above it is in, ties at it by position.
        part = np.argpartition(-scores, k - 1)[:k]
        cut = scores[part].min()
        candidates = np.flatnonzero(scores >= cut)
    else:
        candidates = np.flatnonzero(scores >= floor)
    order = np.lexsort((candidates, -scores[candidates]))[:k]
    chosen = candidates[order]
    return [(int(i), float(scores[i])) for i in chosen]


class MatrixIndex:
    """Exact cosine search on a per-base matrix cached in the process (`SearchIndex`)."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self._snapshots: dict[str, Snapshot] = {}
        self._loads: dict[tuple[str, int], asyncio.Future[Snapshot]] = {}
        self._refreshing: set[asyncio.Task[None]] = set()

    def held(self, base_id: str) -> Snapshot | None:
        """The snapshot of the base this process holds, if any."""
        return self._snapshots.get(base_id)

    def changed(self, base_id: str) -> None:
        """Refresh the snapshots held of the base (of every base for `ALL`) in the background,
        so the next search finds it current: only the documents that changed are read."""
        held = list(self._snapshots) if base_id == ALL else [base_id]
        for found in held:
            if found in self._snapshots:
                task = asyncio.get_running_loop().create_task(self._refresh(found))
                self._refreshing.add(task)
                task.add_done_callback(self._refreshing.discard)

    async def _refresh(self, base_id: str) -> None:
        try:
            async with self._storage.unit_of_work() as uow:
                base = await uow.repo(KnowledgeBase).get(base_id)
            if base is None:
                self._snapshots.pop(base_id, None)  # deleted: its matrix is freed
            else:
                await self.snapshot(base)
        except Exception:
            # The next search loads it (its version tells it is stale): nothing is lost here.
            log.warning("the snapshot of knowledge base %s was not refreshed", base_id)

    async def snapshot(self, base: KnowledgeBase) -> Snapshot:
        """The base's chunks as of its `index_version`: the one held, else one load shared by
        every search that asks meanwhile."""
        held = self._snapshots.get(base.id)
        if held is not None and held.version == base.index_version:
            return held
        key = (base.id, base.index_version)
        loading = self._loads.get(key)
        if loading is None:
            loading = asyncio.ensure_future(self._load(base))
            self._loads[key] = loading
            loading.add_done_callback(lambda done: self._loaded(key, done))
        return await asyncio.shield(loading)

    def _loaded(self, key: tuple[str, int], done: asyncio.Future[Snapshot]) -> None:
        self._loads.pop(key, None)
        if done.cancelled() or done.exception() is not None:
            return
        snapshot = done.result()
        held = self._snapshots.get(snapshot.base_id)
        if held is None or held.version < snapshot.version:
            self._snapshots[snapshot.base_id] = snapshot

    async def _load(self, base: KnowledgeBase) -> Snapshot:
        """The base's snapshot at its `index_version`: the documents unchanged since the one
        held keep their part of it; only the others' chunks are read."""
        dimensions = base.embedding_dimensions or 0
        held = self._snapshots.get(base.id)
        if held is None or held.dimensions != dimensions:
            held = None
        async with self._storage.unit_of_work() as uow:
            found = await uow.repo(KnowledgeDocument).find(
                Where.eq("knowledge_base_id", base.id),
                Where.eq("status", DocumentStatus.READY),
                Where.eq("disabled", False),
                order_by=["id"],
            )
            documents = found.items
            kept = held.parts if held is not None else {}
            reused = {
                d.id: kept[d.id]
                for d in documents
                if d.id in kept and kept[d.id].version == d.version
            }
            missing = {d.id: d for d in documents if d.id not in reused}
            chunks: dict[str, list[KnowledgeChunk]] = {d: [] for d in missing}
            if len(missing) > len(documents) // 2:
                # Most of the base: one read of all its chunks (one scan, in memory).
                every = await uow.repo(KnowledgeChunk).find(Where.eq("knowledge_base_id", base.id))
                for chunk in every.items:
                    if chunk.document_id in chunks:
                        chunks[chunk.document_id].append(chunk)
                del every
            else:
                for document_id in missing:
                    page = await uow.repo(KnowledgeChunk).find(Where.eq("document_id", document_id))
                    chunks[document_id] = page.items
        blocks: list[Matrix] = []
        parts: dict[str, _Part] = {}
        ids: list[str] = []
        views: list[ChunkView] = []
        for document in documents:
            part = reused.get(document.id)
            if part is not None and held is not None:
                rows = held.matrix[part.start : part.start + len(part.chunk_ids)]
                part_ids, part_views = part.chunk_ids, part.views
            else:
                rows, part_ids, part_views = _rows(document, chunks.pop(document.id), dimensions)
            parts[document.id] = _Part(document.version, len(ids), part_ids, part_views)
            blocks.append(rows)
            ids += part_ids
            views += part_views
        matrix = np.concatenate(blocks) if blocks else np.zeros((0, dimensions), np.float32)
        return Snapshot(base.id, base.index_version, dimensions, matrix, ids, views, parts)

    async def search(
        self,
        base: KnowledgeBase,
        vector: Sequence[float],
        *,
        top_k: int,
        min_score: float | None = None,
        where: Filter | None = None,
    ) -> list[Hit]:
        snapshot = await self.snapshot(base)
        if snapshot.size == 0:
            return []
        query = np.asarray(vector, dtype=np.float32)
        if query.shape != (snapshot.matrix.shape[1],):
            return []
        norm = float(np.linalg.norm(query))
        if norm == 0:
            return []
        query = query / norm
        if snapshot.size >= THREAD_ROWS:
            scores = await asyncio.to_thread(np.matmul, snapshot.matrix, query)
        else:
            scores = snapshot.matrix @ query
        if where is not None:
            scores[~snapshot.mask(where)] = -np.inf  # a fresh array: changed in place
        # Masked chunks score -inf, below every floor.
        lowest = float(np.finfo(np.float32).min)
        floor = lowest if min_score is None else max(min_score, lowest)
        best = _best(scores, top_k, floor)
        return [Hit(snapshot.chunk_ids[i], score) for i, score in best]

    async def keyword_search(
        self, base: KnowledgeBase, text: str, *, top_k: int, where: Filter | None = None
    ) -> list[Hit]:
        snapshot = await self.snapshot(base)
        words = set(tokens(text))
        if snapshot.size == 0 or not words:
            return []
        keywords = snapshot.keywords
        if keywords is None:
            keywords = snapshot.keywords = await self._keywords(snapshot)
        scores = np.zeros(snapshot.size, np.float32)
        count = snapshot.size
        for word in words:
            posting = keywords.postings.get(word)
            if posting is None:
                continue
            rows, frequencies = posting
            idf = math.log(1 + (count - rows.size + 0.5) / (rows.size + 0.5))
            lengths = keywords.lengths[rows]
            norm = BM25_K1 * (1 - BM25_B + BM25_B * lengths / keywords.average)
            scores[rows] += idf * frequencies * (BM25_K1 + 1) / (frequencies + norm)
        if where is not None:
            scores[~snapshot.mask(where)] = 0
        best = _best(scores, top_k, float(np.nextafter(np.float32(0), np.float32(1))))
        return [Hit(snapshot.chunk_ids[i], score) for i, score in best]

    async def _keywords(self, snapshot: Snapshot) -> _Keywords:
        """BM25 statistics of the snapshot's chunks, read once, on its first keyword search."""
        counts: dict[str, dict[int, int]] = {}
        lengths = np.zeros(snapshot.size, np.float32)
        position = {chunk_id: i for i, chunk_id in enumerate(snapshot.chunk_ids)}
        async with self._storage.unit_of_work() as uow:
            for start in range(0, snapshot.size, LOAD_PAGE):
                ids = snapshot.chunk_ids[start : start + LOAD_PAGE]
                for chunk in await uow.repo(KnowledgeChunk).get_many(ids):
                    row = position[chunk.id]
                    words = tokens(chunk.content)
                    lengths[row] = len(words)
                    for word in words:
                        rows = counts.setdefault(word, {})
                        rows[row] = rows.get(row, 0) + 1
        postings = {
            word: (
                np.fromiter(rows.keys(), np.int32, len(rows)),
                np.fromiter(rows.values(), np.float32, len(rows)),
            )
            for word, rows in counts.items()
        }
        average = float(lengths.mean()) if snapshot.size else 0.0
        return _Keywords(postings, lengths, average or 1.0)


def _rows(
    document: KnowledgeDocument, chunks: list[KnowledgeChunk], dimensions: int
) -> tuple[Matrix, list[str], list[ChunkView]]:
    """A document's unit vectors in chunk order, their ids and views (chunks of another size,
    from another model, are left out)."""
    usable = sorted(
        (c for c in chunks if len(c.embedding) == 4 * dimensions), key=lambda c: c.chunk_index
    )
    matrix = np.frombuffer(b"".join(c.embedding for c in usable), dtype="<f4").astype(np.float32)
    matrix = matrix.reshape(len(usable), dimensions)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    np.divide(matrix, norms, out=matrix, where=norms > 0)
    return matrix, [c.id for c in usable], [_view(document, c) for c in usable]


def _view(document: KnowledgeDocument, chunk: KnowledgeChunk) -> ChunkView:
    meta = chunk.meta
    return ChunkView(
        metadata=document.meta,
        builtins={
            "_document_id": document.id,
            "_chunk_index": chunk.chunk_index,
            "_title": document.title,
            "_filename": document.source_filename,
            "_content_type": document.content_type,
            "_headings": list(meta.get("headings") or []),
            "_page": meta.get("page"),
            "_row": meta.get("row"),
        },
    )

"""Knowledge bases as workflow steps see them: `knowledge_base_search` and `crag_scoring` call
this (it satisfies the workflows' `KnowledgeSearch` protocol, which this package does not import),
and it answers in the plain documents those steps pass on."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from app.core.errors import NotFound
from app.gateway.calls import CallContext, Caller, Spent
from app.knowledge.grading import LOWER, Thresholds
from app.knowledge.schemas import SearchHit, SearchRequest
from app.knowledge.service import KnowledgeService


@dataclass(frozen=True, slots=True)
class _Document:
    """A document of a step's list as the grader reads it."""

    chunk_id: str
    content: str


@dataclass(frozen=True, slots=True)
class Found:
    """A step's search: the documents, and what embedding the query used."""

    documents: list[dict[str, Any]]
    spent: Spent = field(default_factory=Spent)


@dataclass(frozen=True, slots=True)
class Grades:
    """A step's grading: what the step outputs, and what the judge's calls used."""

    output: dict[str, Any]
    spent: Spent = field(default_factory=Spent)


def _document(hit: SearchHit) -> dict[str, Any]:
    return {
        "id": hit.chunk_id,
        "content": hit.content,
        "score": hit.score,
        "source": hit.title or hit.filename,
        "document_id": hit.document_id,
        "metadata": hit.metadata,
    }


class KnowledgeSteps:
    """Search and CRAG grading for workflow steps, through `KnowledgeService`."""

    def __init__(self, knowledge: KnowledgeService) -> None:
        self._knowledge = knowledge

    async def exists(self, kb_id: str) -> bool:
        try:
            await self._knowledge.get_base(kb_id)
        except NotFound:
            return False
        return True

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
        request = SearchRequest(
            query=query,
            top_k=top_k,
            min_score=min_score,
            filter=dict(filter) if filter is not None else None,
        )
        found = await self._knowledge.search_using(caller, kb_id, request, context=context)
        return Found([_document(hit) for hit in found.results.data], found.spent)

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
        """The documents graded by `judge_model`: those at or above the step's `threshold`
        (CRAG's upper threshold; `lower` marks the ambiguous band) are the relevant ones."""
        upper = float(thresholds.get("upper", thresholds.get("threshold", Thresholds().upper)))
        lower = float(thresholds.get("lower", min(LOWER, upper)))
        given = {str(c.get("id", i)): dict(c) for i, c in enumerate(chunks)}
        gradable = [_Document(id_, str(c.get("content", ""))) for id_, c in given.items()]
        grading = await self._knowledge.grade(
            caller,
            query=query,
            chunks=gradable,
            judge_model=judge_model,
            context=context,
            thresholds=Thresholds(upper=upper, lower=lower),
            include_ambiguous=False,
        )
        scores = {g.chunk.chunk_id: g.score or 0.0 for g in grading.graded}
        relevant = [
            {**given[g.chunk.chunk_id], "relevance": scores[g.chunk.chunk_id]} for g in grading.kept
        ]
        output = {
            "verdict": grading.verdict.value,
            "documents": relevant,
            "relevant_documents": relevant,
            "scores": scores,
            "relevant_count": len(relevant),
            "threshold": upper,
        }
        return Grades(output, grading.spent)

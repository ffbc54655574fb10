"""What workflow steps need of knowledge bases, declared here so this package imports none:
the knowledge service satisfies it, and `build_services` passes it in (or None)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from app.gateway.calls import CallContext, Caller, Spent


class Found(Protocol):
    """The chunks nearest to a query: each `{id, content, score, source?, metadata?}`; and
    what embedding the query used (what the step's record shows)."""

    @property
    def documents(self) -> list[dict[str, Any]]: ...

    @property
    def spent(self) -> Spent: ...


class Grades(Protocol):
    """Chunks graded by a judge model: at least `{documents: [the relevant ones], scores:
    {id: score}}`; and what the judge's calls used."""

    @property
    def output(self) -> dict[str, Any]: ...

    @property
    def spent(self) -> Spent: ...


class KnowledgeSearch(Protocol):
    """Search and grading of knowledge bases, for `caller` (its permissions, limits, budget)."""

    async def exists(self, kb_id: str) -> bool:
        """Whether the knowledge base `kb_id` exists (checked when a workflow is saved)."""
        ...

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
        """The chunks nearest to `query`, and what embedding the query used."""
        ...

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
        """`chunks` graded for relevance to `query` by `judge_model` (CRAG), and what the
        judge's calls used."""
        ...

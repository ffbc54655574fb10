"""Grading retrieved chunks as CRAG does (Yan et al., Corrective Retrieval Augmented
Generation): a judge model scores each chunk's relevance to the query from 0 to 1, and two
thresholds classify the retrieval as correct (some chunk at or above the upper one), incorrect
(every chunk below the lower one) or ambiguous (the rest)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import orjson

from app.core.errors import InvalidInput
from app.gateway.calls import (
    DIRECT,
    CallContext,
    Caller,
    Completion,
    GatewayCalls,
    Spent,
)
from app.gateway.schemas import ChatCompletionRequest
from app.knowledge.schemas import GradeVerdict

UPPER = 0.8
LOWER = 0.5
MAX_CHUNKS = 10
CONCURRENCY = 4
MAX_PASSAGE = 8000
JUDGE_SYSTEM = (
    "You grade how relevant a retrieved passage is to a question. Reply with only a JSON object "
    '{"score": s}, where s is a number from 0 (irrelevant) to 1 (answers the question).'
)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


class Gradable(Protocol):
    """A retrieved chunk: its id and text (a search hit is one)."""

    @property
    def chunk_id(self) -> str: ...

    @property
    def content(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Thresholds:
    upper: float = UPPER
    lower: float = LOWER

    def __post_init__(self) -> None:
        if not 0 <= self.lower <= self.upper <= 1:
            raise InvalidInput("the thresholds need 0 <= lower <= upper <= 1", param="thresholds")

    def verdict(self, score: float) -> GradeVerdict:
        if score >= self.upper:
            return GradeVerdict.CORRECT
        if score >= self.lower:
            return GradeVerdict.AMBIGUOUS
        return GradeVerdict.INCORRECT


@dataclass(frozen=True, slots=True)
class Graded:
    """One chunk's grade; `score` is None when the judge's answer held no score (graded 0)."""

    chunk: Gradable
    score: float | None
    verdict: GradeVerdict


@dataclass(frozen=True, slots=True)
class Grading:
    """The retrieval's verdict, every chunk's grade (in the order given), and the chunks kept:
    the correct ones, and the ambiguous ones when asked, best first."""

    verdict: GradeVerdict
    graded: list[Graded]
    kept: list[Graded]
    # What the judge's calls used, all together.
    spent: Spent = field(default_factory=Spent)


def read_score(answer: str) -> float | None:
    """The score in a judge's answer: `{"score": s}`, else the first number; clamped to 0..1."""
    text = answer.strip()
    value: object = None
    start, end = text.find("{"), text.rfind("}")
    if start != -1 and end > start:
        try:
            parsed = orjson.loads(text[start : end + 1])
        except orjson.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict):
            value = parsed.get("score")
    if not isinstance(value, int | float) or isinstance(value, bool):
        found = _NUMBER.search(text)
        value = float(found.group()) if found else None
    if value is None:
        return None
    return min(1.0, max(0.0, float(value)))


async def grade(
    calls: GatewayCalls,
    caller: Caller,
    *,
    query: str,
    chunks: Sequence[Gradable],
    judge_model: str,
    context: CallContext = DIRECT,
    thresholds: Thresholds | None = None,
    include_ambiguous: bool = True,
    max_chunks: int = MAX_CHUNKS,
) -> Grading:
    """Grade the first `max_chunks` chunks with `judge_model`, each call made for `caller`
    through the gateway's one path (its permissions, limits, budgets and usage)."""
    limits = thresholds or Thresholds()
    caller.ensure_can_call(judge_model)
    gate = asyncio.Semaphore(CONCURRENCY)

    async def judged(chunk: Gradable) -> tuple[Graded, Completion]:
        request = ChatCompletionRequest.model_validate(
            {
                "model": judge_model,
                "temperature": 0,
                "max_tokens": 20,
                "messages": [
                    {"role": "system", "content": JUDGE_SYSTEM},
                    {
                        "role": "user",
                        "content": f"Question:\n{query}\n\nPassage:\n{chunk.content[:MAX_PASSAGE]}",
                    },
                ],
            }
        )
        async with gate:
            completion = await calls.complete(caller, request, context)
            await completion.settle()
        choices = completion.body.get("choices") or [{}]
        content = (choices[0].get("message") or {}).get("content") or ""
        score = read_score(str(content))
        return Graded(chunk, score, limits.verdict(score or 0.0)), completion

    answers = await asyncio.gather(*(judged(c) for c in chunks[:max_chunks]))
    graded = [g for g, _ in answers]
    verdicts = {g.verdict for g in graded}
    if GradeVerdict.CORRECT in verdicts:
        verdict = GradeVerdict.CORRECT
    elif GradeVerdict.AMBIGUOUS in verdicts:
        verdict = GradeVerdict.AMBIGUOUS
    else:
        verdict = GradeVerdict.INCORRECT
    wanted = {GradeVerdict.CORRECT} | ({GradeVerdict.AMBIGUOUS} if include_ambiguous else set())
    kept = sorted((g for g in graded if g.verdict in wanted), key=lambda g: -(g.score or 0.0))
    spent = sum((Spent.of(c.body, c.headers) for _, c in answers), Spent())
    return Grading(verdict, graded, kept, spent)

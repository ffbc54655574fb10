"""CRAG grading: a judge model (the mock, told what to answer) scores chunks, thresholds
classify the retrieval, and the calls are the caller's."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from app.access.permissions import KeyPermissions
from app.access.service import Principal
from app.core.errors import InvalidInput, PermissionDenied
from app.knowledge.grading import Thresholds, read_score
from app.knowledge.schemas import GradeVerdict
from app.models.schemas import ModelCreate, ModelParameters
from app.storage.protocol import Where
from app.usage.entities import UsageRecord, UsageType
from tests.knowledge.conftest import Gateway

CALLER = Principal(key_id="key-grader", team_id="team-grader", admin=False)


@dataclass(frozen=True)
class Chunk:
    chunk_id: str
    content: str


CHUNKS = [
    Chunk("tax", "Tax rules for small companies."),
    Chunk("penguin", "Penguins live in the Antarctic."),
    Chunk("walrus", "Walruses live in the Arctic."),
    Chunk("zebra", "Zebras have stripes."),
]


@pytest.fixture
async def judge(gateway: Gateway) -> str:
    replies = {"Penguins": '{"score": 0.9}', "Walruses": "Score: 0.6", "Tax": '{"score": 0.1}'}
    await gateway.services.models.create(
        ModelCreate(
            id="judge",
            provider="mock",  # type: ignore[arg-type]
            provider_model="mock",
            parameters=ModelParameters(mock_replies=replies),
        )
    )
    return "judge"


async def test_grading_classifies_each_chunk_and_keeps_the_relevant_ones_best_first(
    gateway: Gateway, judge: str
) -> None:
    grading = await gateway.services.knowledge.grade(
        CALLER, query="Which animals live in the cold?", chunks=CHUNKS, judge_model=judge
    )

    assert [(g.chunk.chunk_id, g.score, g.verdict) for g in grading.graded] == [
        ("tax", 0.1, GradeVerdict.INCORRECT),
        ("penguin", 0.9, GradeVerdict.CORRECT),
        ("walrus", 0.6, GradeVerdict.AMBIGUOUS),
        ("zebra", None, GradeVerdict.INCORRECT),  # the judge's answer held no score
    ]
    assert grading.verdict is GradeVerdict.CORRECT
    assert [g.chunk.chunk_id for g in grading.kept] == ["penguin", "walrus"]

    async with gateway.storage.unit_of_work() as uow:
        calls = await uow.repo(UsageRecord).count(
            Where.eq("api_key_id", "key-grader"), Where.eq("usage_type", UsageType.CHAT_COMPLETION)
        )
    assert calls == 4  # one judged call per chunk, each the caller's


async def test_the_thresholds_decide_between_ambiguous_and_incorrect(
    gateway: Gateway, judge: str
) -> None:
    knowledge = gateway.services.knowledge
    without_best = [c for c in CHUNKS if c.chunk_id != "penguin"]

    ambiguous = await knowledge.grade(
        CALLER, query="cold", chunks=without_best, judge_model=judge, include_ambiguous=False
    )
    strict = await knowledge.grade(
        CALLER,
        query="cold",
        chunks=without_best,
        judge_model=judge,
        thresholds=Thresholds(upper=0.95, lower=0.7),
    )

    assert ambiguous.verdict is GradeVerdict.AMBIGUOUS and ambiguous.kept == []
    assert strict.verdict is GradeVerdict.INCORRECT and strict.kept == []


async def test_a_caller_not_allowed_the_judge_is_refused_before_any_call(
    gateway: Gateway, judge: str
) -> None:
    caller = Principal(
        key_id="key-limited", team_id=None, admin=False, permissions=KeyPermissions(models=["mock"])
    )
    with pytest.raises(PermissionDenied):
        await gateway.services.knowledge.grade(caller, query="q", chunks=CHUNKS, judge_model=judge)


@pytest.mark.parametrize(
    ("answer", "score"),
    [
        ('{"score": 0.75}', 0.75),
        ("Relevance: 0.3 of 1", 0.3),
        ("7", 1.0),
        ('{"score": -2}', 0.0),
        ("no idea", None),
    ],
)
def test_a_judges_answer_is_read_as_a_score_between_zero_and_one(
    answer: str, score: float | None
) -> None:
    assert read_score(answer) == score


def test_thresholds_must_be_ordered() -> None:
    with pytest.raises(InvalidInput):
        Thresholds(upper=0.4, lower=0.6)

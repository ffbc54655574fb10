"""Metadata filters: one contract, the same answers from every backend, and refusals that name
the part of the filter that is wrong."""

from __future__ import annotations

from typing import Any

import pytest

from app.core.errors import InvalidInput
from app.knowledge.filters import parse_filter
from tests.knowledge.conftest import Gateway

DOCUMENTS: dict[str, dict[str, Any]] = {
    "A": {"lang": "en", "year": 2024, "tags": ["a", "b"], "score": 0.5, "author": {"name": "Ada"}},
    "B": {"lang": "fr", "year": 2025, "tags": ["b"], "draft": True},
    "C": {"lang": "en", "year": 2026, "score": 1, "author": {"name": "Alan"}, "note": None},
    "D": {},
}

CASES: list[tuple[dict[str, Any], set[str]]] = [
    ({"field": "lang", "op": "eq", "value": "en"}, {"A", "C"}),
    ({"field": "lang", "op": "ne", "value": "en"}, {"B", "D"}),
    ({"field": "year", "op": "gt", "value": 2024}, {"B", "C"}),
    ({"field": "year", "op": "gte", "value": 2024}, {"A", "B", "C"}),
    ({"field": "year", "op": "lt", "value": 2026}, {"A", "B"}),
    ({"field": "score", "op": "lte", "value": 0.5}, {"A"}),
    ({"field": "score", "op": "eq", "value": 1.0}, {"C"}),  # numbers compare by value
    ({"field": "draft", "op": "eq", "value": 1}, set()),  # true is not 1
    ({"field": "lang", "op": "gt", "value": "e"}, {"A", "B", "C"}),  # strings compare as text
    ({"field": "year", "op": "gt", "value": "2024"}, set()),  # a number is not a string
    ({"field": "lang", "op": "in", "value": ["fr", "de"]}, {"B"}),
    ({"field": "lang", "op": "nin", "value": ["en"]}, {"B", "D"}),
    ({"field": "draft", "op": "exists"}, {"B"}),
    ({"field": "note", "op": "exists"}, set()),  # null counts as absent
    ({"field": "note", "op": "exists", "value": False}, {"A", "B", "C", "D"}),
    ({"field": "author.name", "op": "exists"}, {"A", "C"}),
    ({"field": "tags", "op": "contains", "value": "b"}, {"A", "B"}),
    ({"field": "author.name", "op": "contains", "value": "la"}, {"C"}),
    (
        {
            "and": [
                {"field": "lang", "op": "eq", "value": "en"},
                {"field": "year", "op": "gte", "value": 2025},
            ]
        },
        {"C"},
    ),
    (
        {
            "or": [
                {"field": "lang", "op": "eq", "value": "fr"},
                {"field": "score", "op": "gt", "value": 0.9},
            ]
        },
        {"B", "C"},
    ),
    ({"not": {"field": "lang", "op": "eq", "value": "en"}}, {"B", "D"}),
    ({"field": "_title", "op": "in", "value": ["B", "D"]}, {"B", "D"}),
    ({"field": "_chunk_index", "op": "eq", "value": 0}, {"A", "B", "C", "D"}),
]


async def test_every_backend_applies_each_filter_the_same_way(gateway: Gateway) -> None:
    await gateway.base()
    for title, metadata in DOCUMENTS.items():
        await gateway.document(
            content=f"document {title} about things", title=title, metadata=metadata
        )
    await gateway.run_jobs()

    for where, expected in CASES:
        answer = await gateway.admin.post(
            "/v1/knowledge-bases/docs/search",
            json={"query": "document about things", "top_k": 100, "filter": where},
        )
        assert answer.status_code == 200, (where, answer.text)
        assert {hit["title"] for hit in answer.json()["data"]} == expected, where


@pytest.mark.parametrize(
    ("where", "param"),
    [
        ({"field": "x", "op": "regex", "value": 1}, "filter.op"),
        ({"and": []}, "filter.and"),
        ({"and": [{"field": "x", "op": "eq"}]}, "filter.and.0.value"),
        (
            {
                "or": [
                    {"field": "x", "op": "eq", "value": 1},
                    {"not": {"field": "_secret", "op": "exists"}},
                ]
            },
            "filter.or.1.not.field",
        ),
        ({"field": "x", "op": "in", "value": "a"}, "filter.value"),
        ({"field": "x", "op": "gt", "value": True}, "filter.value"),
        ({"field": "x", "op": "eq", "value": {"nested": 1}}, "filter.value"),
        ({"field": "x", "op": "in", "value": [1, [2]]}, "filter.value.1"),
        ({"and": [{"field": "x", "op": "eq", "value": 1}], "field": "y"}, "filter"),
        ({"field": "", "op": "eq", "value": 1}, "filter.field"),
        (["not", "an", "object"], "filter"),
    ],
)
def test_a_malformed_filter_is_refused_naming_its_part(where: Any, param: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        parse_filter(where)

    assert refused.value.param == param, refused.value.message


def test_filters_nest_only_so_deep() -> None:
    where: dict[str, Any] = {"field": "x", "op": "exists"}
    for _ in range(12):
        where = {"not": where}

    with pytest.raises(InvalidInput) as refused:
        parse_filter(where)
    assert "deep" in refused.value.message


async def test_the_search_route_answers_a_bad_filter_with_a_400_naming_it(gateway: Gateway) -> None:
    await gateway.base()
    answer = await gateway.admin.post(
        "/v1/knowledge-bases/docs/search",
        json={"query": "q", "filter": {"field": "lang", "op": "like", "value": "en"}},
    )

    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "filter.op"

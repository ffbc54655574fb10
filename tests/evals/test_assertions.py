"""Every assertion type on known outputs: pass, fail and `not-`, with the edge cases."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from app.core.errors import InvalidInput
from app.evals.assertions import (
    SPECS,
    Embeddings,
    Judged,
    Output,
    Verdict,
    grade,
    json_values_in,
    parse,
    rouge_n,
    score_case,
)


@dataclass
class ScriptedGrader:
    """Answers judge calls with `answers` in turn and embeds by a fixed table."""

    answers: list[str] = field(default_factory=list)
    vectors: dict[str, list[float]] = field(default_factory=dict)
    judged: list[tuple[str | None, list[dict[str, str]]]] = field(default_factory=list)
    fail_embedding: bool = False

    async def judge(self, model: str | None, messages: list[dict[str, str]]) -> Judged:
        self.judged.append((model, messages))
        return Judged(self.answers.pop(0), tokens=12)

    async def embed(self, model: str | None, texts: list[str]) -> Embeddings:
        if self.fail_embedding:
            return Embeddings([[1.0, 0.0]], tokens=1)
        return Embeddings([self.vectors.get(t, [0.0, 1.0]) for t in texts], tokens=len(texts))


async def verdict(
    raw: dict[str, Any], text: str, grader: ScriptedGrader | None = None, **output: Any
) -> Verdict:
    return await grade(parse(raw), Output(text, **output), grader or ScriptedGrader())


async def outcome(raw: dict[str, Any], text: str, **output: Any) -> bool:
    return (await verdict(raw, text, **output)).passed


# (assertion, an output it passes on, an output it fails on)
DETERMINISTIC: list[tuple[dict[str, Any], str, str]] = [
    ({"type": "equals", "value": "Paris"}, "Paris", "Paris."),
    ({"type": "equals", "value": 42}, "42", "42.0"),
    ({"type": "equals", "value": {"a": [1, 2]}}, '{"a": [1, 2.0]}', '{"a": [1, true]}'),
    ({"type": "contains", "value": "Paris"}, "It is Paris.", "It is paris."),
    ({"type": "icontains", "value": "PARIS"}, "it is paris", "it is Lyon"),
    ({"type": "contains-any", "value": ["Paris", "Lyon"]}, "Lyon!", "Nice!"),
    ({"type": "contains-any", "value": "Paris, Lyon"}, "in Lyon", "in Nice"),
    ({"type": "contains-all", "value": ["a", "b"]}, "b and a", "only a"),
    ({"type": "icontains-any", "value": ["PARIS"]}, "paris", "rome"),
    ({"type": "icontains-all", "value": ["A", "B"]}, "a b", "a"),
    ({"type": "starts-with", "value": "Yes"}, "Yes, indeed", "Well, yes"),
    ({"type": "regex", "value": r"^\d{3}-\d{4}$"}, "555-1234", "555-12345"),
    ({"type": "regex", "value": "(?i)hello"}, "HeLLo there", "goodbye"),
    ({"type": "is-json"}, '{"a": 1}', "{'a': 1}"),
    ({"type": "is-json"}, "[1, 2]", "NaN"),
    (
        {"type": "is-json", "value": {"type": "object", "required": ["name"]}},
        '{"name": "Ada"}',
        '{"nome": "Ada"}',
    ),
    ({"type": "contains-json"}, 'Here: ```json\n{"a": 1}\n``` done', "no json {here"),
    (
        {"type": "contains-json", "value": {"type": "object", "required": ["b"]}},
        'first {"a": 1} then {"b": 2}',
        'only {"a": 1}',
    ),
    (
        {"type": "json-path", "path": "$.user.name", "value": "Ada"},
        '{"user": {"name": "Ada"}}',
        '{"user": {"name": "Bob"}}',
    ),
    (
        {"type": "json-path", "path": "$.items[1]", "value": 2},
        '{"items": [1, 2]}',
        '{"items": [1, true]}',
    ),
    (
        {"type": "json-path", "path": "$.items[?(@.ok == true)].id"},
        '{"items": [{"ok": true, "id": 1}]}',
        '{"items": [{"ok": false, "id": 1}]}',
    ),
    ({"type": "json-path", "path": "$.a"}, '{"a": null}', "not json"),
    ({"type": "levenshtein", "value": "kitten"}, "sitting", "a cat sat"),
    ({"type": "levenshtein", "value": "kitten", "threshold": 1}, "kitteN", "sitting"),
    (
        {"type": "rouge-n", "value": "the cat sat on the mat"},
        "the cat sat on the mat today",
        "a dog ran",
    ),
    ({"type": "latency", "threshold": 500}, "x", "x"),
]


@pytest.mark.parametrize(("raw", "passing", "failing"), DETERMINISTIC)
async def test_a_deterministic_assertion_passes_fails_and_its_inverse_does_the_opposite(
    raw: dict[str, Any], passing: str, failing: str
) -> None:
    latency = {"latency_ms": 100} if raw["type"] == "latency" else {}
    failing_latency = {"latency_ms": 900} if raw["type"] == "latency" else {}

    good = await verdict(raw, passing, **latency)
    bad = await verdict(raw, failing, **failing_latency)
    not_good = await verdict({**raw, "type": "not-" + raw["type"]}, passing, **latency)
    not_bad = await verdict({**raw, "type": "not-" + raw["type"]}, failing, **failing_latency)

    assert (good.passed, bad.passed, not_good.passed, not_bad.passed) == (True, False, False, True)
    assert good.error is bad.error is not_good.error is not_bad.error is None
    assert good.score == 1.0 and not_good.score == 0.0
    assert not_bad.score == 1.0 - bad.score
    assert bad.reason and not_good.reason


def test_every_promptfoo_assertion_named_in_the_issue_is_known() -> None:
    named = {
        "equals", "contains", "icontains", "contains-any", "contains-all", "starts-with",
        "regex", "is-json", "contains-json", "json-path", "similar", "levenshtein", "rouge-n",
        "latency", "cost", "llm-rubric", "model-graded-closedqa",
    }  # fmt: skip
    assert named <= set(SPECS)


async def test_cost_passes_within_its_threshold_and_errors_when_the_cost_is_unknown() -> None:
    raw = {"type": "cost", "threshold": 0.01}
    assert await outcome(raw, "x", cost_usd=0.002)
    assert not await outcome(raw, "x", cost_usd=0.02)
    assert await outcome({**raw, "type": "not-cost"}, "x", cost_usd=0.02)
    unknown = await verdict({**raw, "type": "not-cost"}, "x")
    assert not unknown.passed and unknown.error and "unknown" in unknown.error


async def test_rouge_n_scores_reference_recall_and_its_inverse_scores_the_rest() -> None:
    assert rouge_n("the cat", "the cat sat on the mat") == pytest.approx(2 / 6)
    assert rouge_n("", "the cat") == 0.0
    half = await verdict({"type": "rouge-n", "value": "a b c d", "threshold": 0.5}, "a b")
    assert half.passed and half.score == pytest.approx(0.5)
    inverse = await verdict({"type": "not-rouge-n", "value": "a b c d"}, "a b")
    assert inverse.passed and inverse.score == pytest.approx(0.5)


async def test_similar_compares_embeddings_with_the_threshold_and_any_value_may_match() -> None:
    grader = ScriptedGrader(
        vectors={"out": [1.0, 0.0], "near": [0.9, 0.1], "far": [0.0, 1.0], "mid": [0.7, 0.7]}
    )
    near = await verdict({"type": "similar", "value": "near"}, "out", grader)
    far = await verdict({"type": "similar", "value": ["far", "near"]}, "out", grader)
    strict = await verdict({"type": "similar", "value": "mid", "threshold": 0.8}, "out", grader)
    inverse = await verdict({"type": "not-similar", "value": ["far", "mid"]}, "out", grader)

    assert near.passed and near.score > 0.99
    assert far.passed  # "near" matched
    assert not strict.passed and strict.score == pytest.approx(0.7071, abs=1e-3)
    assert inverse.passed  # "mid" is the closest, at 0.707, under the default 0.75
    assert inverse.score == pytest.approx(1 - 0.7071, abs=1e-3)


async def test_not_similar_passes_only_when_the_output_is_unlike_every_value() -> None:
    grader = ScriptedGrader(vectors={"out": [1.0, 0.0], "far": [0.0, 1.0], "same": [2.0, 0.0]})
    unlike = await verdict({"type": "not-similar", "value": ["far"]}, "out", grader)
    one_alike = await verdict({"type": "not-similar", "value": ["far", "same"]}, "out", grader)
    assert unlike.passed and unlike.score == pytest.approx(1.0)
    assert not one_alike.passed


async def test_similar_whose_embeddings_fail_is_errored_even_inverted() -> None:
    grader = ScriptedGrader(fail_embedding=True)
    for kind in ("similar", "not-similar"):
        result = await verdict({"type": kind, "value": "x"}, "out", grader)
        assert not result.passed and result.error


async def test_llm_rubric_reads_the_judges_json_verdict_and_score() -> None:
    grader = ScriptedGrader(
        answers=[
            '{"reason": "polite", "pass": true, "score": 0.9}',
            'Sure! ```json\n{"pass": false, "score": 0.2, "reason": "rude"}\n```',
            '{"reason": "ok", "pass": true, "score": 0.6}',
            '{"score": 0.4}',
        ]
    )
    rubric = {"type": "llm-rubric", "value": "is polite", "provider": "judge-x"}

    polite = await verdict(rubric, "Thank you!", grader)
    rude = await verdict(rubric, "Go away", grader)
    below = await verdict({**rubric, "threshold": 0.7}, "Fine.", grader)
    score_only = await verdict(rubric, "Hm.", grader)

    assert (polite.passed, polite.score, polite.reason) == (True, 0.9, "polite")
    assert (rude.passed, rude.score, rude.reason) == (False, 0.2, "rude")
    assert not below.passed  # the judge passed it, but its score is under the threshold
    assert not score_only.passed and score_only.score == 0.4
    model, messages = grader.judged[0]
    assert model == "judge-x"
    assert "is polite" in messages[-1]["content"] and "Thank you!" in messages[-1]["content"]
    assert polite.tokens == 12


async def test_not_llm_rubric_inverts_the_judges_verdict_and_score() -> None:
    grader = ScriptedGrader(answers=['{"pass": true, "score": 0.9, "reason": "r"}'])
    result = await verdict({"type": "not-llm-rubric", "value": "mentions prices"}, "x", grader)
    assert not result.passed and result.score == pytest.approx(0.1)


@pytest.mark.parametrize(
    "answer",
    [
        "I think it passes.",
        '{"pass": "yes", "score": 1}',
        '{"pass": true, "score": 7}',
        '{"verdict": "pass"}',
        "",
    ],
)
async def test_a_judge_answer_that_is_not_the_json_asked_for_is_an_errored_verdict(
    answer: str,
) -> None:
    for kind in ("llm-rubric", "not-llm-rubric"):
        grader = ScriptedGrader(answers=[answer])
        result = await verdict({"type": kind, "value": "is polite"}, "x", grader)
        assert not result.passed and result.score == 0.0
        assert result.error and "judge" in result.error


async def test_model_graded_closedqa_reads_the_judges_last_line() -> None:
    grader = ScriptedGrader(answers=["It names the capital.\nY", "No capital.\n**N**", "Maybe"])
    raw = {"type": "model-graded-closedqa", "value": "names the capital of France"}
    yes = await verdict(raw, "Paris", grader, task="What is the capital of France?")
    no = await verdict(raw, "Lyon", grader, task="What is the capital of France?")
    unclear = await verdict(raw, "?", grader, task="q")
    assert yes.passed and not no.passed and no.error is None
    assert unclear.error and not unclear.passed
    _, messages = grader.judged[0]
    assert "What is the capital of France?" in messages[-1]["content"]
    inverse = await verdict(
        {**raw, "type": "not-model-graded-closedqa"}, "Lyon", ScriptedGrader(answers=["N"])
    )
    assert inverse.passed


async def test_a_pattern_that_runs_out_of_time_is_errored_not_a_hung_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from app.evals import assertions

    monkeypatch.setattr(assertions, "REGEX_TIMEOUT_SECONDS", 0.05)
    result = await verdict({"type": "regex", "value": r"(a|aa)+$"}, "a" * 35 + "b")
    assert not result.passed and result.error and "longer than" in result.error


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        ({"type": "regex", "value": "(unclosed"}, "assertions.1.value"),
        ({"type": "contains"}, "assertions.1.value"),
        ({"type": "contains", "value": ""}, "assertions.1.value"),
        ({"type": "contains-any", "value": []}, "assertions.1.value"),
        ({"type": "is-json", "value": {"type": "no-such-type"}}, "assertions.1.value"),
        ({"type": "is-json", "value": "{not json"}, "assertions.1.value"),
        ({"type": "json-path", "value": 1}, "assertions.1.path"),
        ({"type": "json-path", "path": "$[[["}, "assertions.1.path"),
        ({"type": "latency"}, "assertions.1.threshold"),
        ({"type": "cost", "threshold": -1}, "assertions.1.threshold"),
        ({"type": "similar", "value": "x", "threshold": 2}, "assertions.1.threshold"),
        ({"type": "contains", "value": "x", "weight": "heavy"}, "assertions.1.weight"),
        ({"type": "llm-rubric"}, "assertions.1.value"),
        ({"type": "javascript", "value": "output.length > 3"}, "assertions.1.type"),
        ({"type": "not-python", "value": "True"}, "assertions.1.type"),
        ({"type": "contains", "value": "x", "transform": "output"}, "assertions.1.transform"),
    ],
)
def test_an_assertion_that_cannot_run_is_refused_when_saved_naming_its_field(
    raw: dict[str, Any], param: str
) -> None:
    with pytest.raises(InvalidInput) as refused:
        parse(raw, param="assertions.1")
    assert refused.value.param == param


def test_json_values_in_text_are_found_around_prose_and_fences() -> None:
    text = 'say {"a": 1} and [1, 2] but not {broken and {"b": {"c": []}}'
    assert json_values_in(text) == [{"a": 1}, [1, 2], {"b": {"c": []}}]


def _v(passed: bool, score: float, weight: float = 1.0, error: str | None = None) -> Verdict:
    return Verdict("contains", passed, score, "r", weight=weight, error=error)


def test_a_case_score_is_the_weighted_mean_and_every_assertion_must_pass() -> None:
    result = score_case([_v(True, 1.0, 3), _v(False, 0.0, 1)])
    assert result.score == pytest.approx(0.75) and not result.passed
    assert score_case([_v(True, 1.0), _v(True, 0.5)]).passed


def test_with_a_threshold_a_case_passes_on_its_score_despite_a_failed_assertion() -> None:
    verdicts = [_v(True, 1.0, 3), _v(False, 0.0, 1)]
    assert score_case(verdicts, threshold=0.7).passed
    assert not score_case(verdicts, threshold=0.8).passed


def test_an_errored_verdict_errors_the_case_whatever_the_threshold() -> None:
    result = score_case([_v(True, 1.0, 10), _v(False, 0.0, 0.1, error="judge down")], 0.5)
    assert result.errored and not result.passed


def test_a_case_without_assertions_passes() -> None:
    assert score_case([]).passed


async def test_a_schema_whose_reference_cannot_be_resolved_errs_and_fetches_nothing() -> None:
    schema = {"$ref": "https://example.invalid/schema.json"}
    for kind in ("is-json", "not-is-json"):
        result = await verdict({"type": kind, "value": schema}, '{"a": 1}')
        assert not result.passed and result.error

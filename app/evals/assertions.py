"""Assertions on a test case's output, with promptfoo's names and semantics.

Each assertion is a stored mapping: `type` (e.g. `contains`; `not-contains` for the inverse),
`value`, `threshold`, `weight`, `metric`, `provider` (the model that grades or embeds) and
`path` (for `json-path`). `parse` checks one when a test case is saved, so a run never meets a
malformed one; `grade` gives its `Verdict` on an `Output`. No assertion runs code a user
supplies: regular expressions run with a time limit, JSON Schema and JSONPath are data.

The rule of `not-`: every check establishes a fact (the output contains the value, the judge
says it passes) with a score for that fact; the assertion passes when the fact holds, its
inverse when it does not, and the inverse's score is one minus the fact's. An assertion that
could not be graded (a judge answering something else than the JSON asked for, an embedding
call that failed, a pattern that ran out of time) is an errored verdict, never inverted.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import jsonschema
import orjson
import regex
from jsonpath_ng import JSONPath
from jsonpath_ng.exceptions import JsonPathLexerError, JsonPathParserError
from jsonpath_ng.ext.parser import parse as parse_json_path
from rapidfuzz.distance import Levenshtein

from app.core.errors import Cancelled, InvalidInput

log = logging.getLogger(__name__)

NOT = "not-"
REGEX_TIMEOUT_SECONDS = 1.0
SIMILAR_THRESHOLD = 0.75
ROUGE_THRESHOLD = 0.75
LEVENSHTEIN_THRESHOLD = 5.0
# An llm-rubric answer with a score and no verdict passes from this score on.
RUBRIC_PASS_SCORE = 0.5
MAX_VALUE_LIST = 500
_REASON_MAX = 1000
_JSON_SCAN_MAX = 200  # where contains-json tries a JSON value to start, at most
_KEYS = frozenset({"type", "value", "threshold", "weight", "metric", "provider", "path"})


class GradingError(Exception):
    """An assertion could not be graded; its verdict is errored, with this message."""


@dataclass(frozen=True, slots=True)
class Output:
    """What assertions look at: the target's answer as text, how long it took, what it cost,
    and what it was asked (`model-graded-closedqa`'s task)."""

    text: str
    latency_ms: int = 0
    cost_usd: float | None = None
    task: str = ""


@dataclass(frozen=True, slots=True)
class Judged:
    """A judge model's answer and the tokens it took."""

    text: str
    tokens: int = 0


@dataclass(frozen=True, slots=True)
class Embeddings:
    """Vectors in the order of the texts asked for, and the tokens they took."""

    vectors: list[list[float]]
    tokens: int = 0


class Grader(Protocol):
    """The model calls of model-graded assertions (a judge's answer, embeddings), made for the
    run's caller; `model` None means the run's judge or embedding model."""

    async def judge(self, model: str | None, messages: list[dict[str, str]]) -> Judged: ...

    async def embed(self, model: str | None, texts: list[str]) -> Embeddings: ...


@dataclass(frozen=True, slots=True)
class Assertion:
    """A checked assertion, ready to grade: `compiled` holds its pattern, schema validator or
    JSONPath."""

    type: str
    base: str
    inverse: bool
    value: Any = None
    threshold: float | None = None
    weight: float = 1.0
    metric: str | None = None
    provider: str | None = None
    path: str | None = None
    compiled: Any = None

    @property
    def judged(self) -> bool:
        """Graded by a judge model (the suite's judge unless `provider` names one)."""
        return self.base in JUDGED

    @property
    def embedded(self) -> bool:
        """Graded with embeddings (the suite's embedding model unless `provider` names one)."""
        return self.base == "similar"


@dataclass(slots=True)
class Verdict:
    """An assertion's outcome: passed or not, its score in [0, 1], and why."""

    type: str
    passed: bool
    score: float
    reason: str
    weight: float = 1.0
    metric: str | None = None
    error: str | None = None
    tokens: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "passed": self.passed,
            "score": self.score,
            "weight": self.weight,
            "reason": self.reason,
            "error": self.error,
            "metric": self.metric,
            "tokens": self.tokens,
        }


@dataclass(frozen=True, slots=True)
class _Fact:
    """What a check found: whether its fact holds, the fact's score (None: 1 or 0), why."""

    holds: bool
    reason: str
    score: float | None = None
    tokens: int | None = None


# ---- parsing -----------------------------------------------------------------------------------


def parse(raw: Mapping[str, Any], *, param: str = "assertion") -> Assertion:
    """Check one stored assertion; `InvalidInput` names the field (`{param}.value`) otherwise."""
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise InvalidInput(
            f"unknown assertion field '{unknown[0]}'; known: {', '.join(sorted(_KEYS))}",
            param=f"{param}.{unknown[0]}",
        )
    kind = raw.get("type")
    if not isinstance(kind, str) or not kind:
        raise InvalidInput("an assertion needs a type, e.g. 'contains'", param=f"{param}.type")
    inverse = kind.startswith(NOT)
    base = kind.removeprefix(NOT)
    spec = SPECS.get(base)
    if spec is None:
        raise InvalidInput(
            f"unknown assertion type '{kind}'; known: {', '.join(sorted(SPECS))} "
            f"(each also as '{NOT}<type>')",
            param=f"{param}.type",
        )
    weight = _number(raw.get("weight", 1.0), f"{param}.weight", minimum=0.0)
    threshold = raw.get("threshold")
    if threshold is not None:
        threshold = _number(threshold, f"{param}.threshold", minimum=0.0)
    metric, provider, path = (_optional_text(raw, k, param) for k in ("metric", "provider", "path"))
    assertion = Assertion(
        type=kind,
        base=base,
        inverse=inverse,
        value=raw.get("value"),
        threshold=threshold,
        weight=weight,
        metric=metric,
        provider=provider,
        path=path,
    )
    return spec.prepare(assertion, param)


def parse_all(raws: Sequence[Mapping[str, Any]], *, param: str = "assertions") -> list[Assertion]:
    return [parse(raw, param=f"{param}.{i}") for i, raw in enumerate(raws)]


def _number(value: Any, param: str, *, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidInput("must be a number", param=param)
    if minimum is not None and value < minimum:
        raise InvalidInput(f"must be at least {minimum:g}", param=param)
    return float(value)


def _optional_text(raw: Mapping[str, Any], key: str, param: str) -> str | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > 2000:
        raise InvalidInput(f"{key} must be a non-empty string", param=f"{param}.{key}")
    return value


def _replace(assertion: Assertion, **changes: Any) -> Assertion:
    return dataclasses.replace(assertion, **changes)


def _as_text(value: Any) -> str:
    """A value as promptfoo compares it with the output: numbers and booleans written out."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _text_value(assertion: Assertion, param: str) -> Assertion:
    value = assertion.value
    if isinstance(value, bool) or not isinstance(value, str | int | float) or value == "":
        raise InvalidInput(
            f"a '{assertion.type}' assertion needs a string (or number) value",
            param=f"{param}.value",
        )
    return _replace(assertion, value=_as_text(value))


def _list_value(assertion: Assertion, param: str) -> Assertion:
    value = assertion.value
    if isinstance(value, str):  # promptfoo reads a string as comma-separated values
        value = [part.strip() for part in value.split(",") if part.strip()]
    if (
        not isinstance(value, list)
        or not value
        or len(value) > MAX_VALUE_LIST
        or any(isinstance(v, bool) or not isinstance(v, str | int | float) for v in value)
    ):
        raise InvalidInput(
            f"a '{assertion.type}' assertion needs a non-empty list of strings as its value",
            param=f"{param}.value",
        )
    return _replace(assertion, value=[_as_text(v) for v in value])


def _any_value(assertion: Assertion, param: str) -> Assertion:
    if assertion.value is None:
        raise InvalidInput(f"a '{assertion.type}' assertion needs a value", param=f"{param}.value")
    return assertion


def _regex_value(assertion: Assertion, param: str) -> Assertion:
    assertion = _text_value(assertion, param)
    try:
        compiled = regex.compile(assertion.value)
    except (regex.error, OverflowError, ValueError, RecursionError) as exc:
        raise InvalidInput(f"invalid regular expression: {exc}", param=f"{param}.value") from exc
    return _replace(assertion, compiled=compiled)


def _schema_value(assertion: Assertion, param: str) -> Assertion:
    schema = assertion.value
    if schema is None or schema == "":
        return _replace(assertion, value=None)
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise InvalidInput(
                "the value must be a JSON Schema (an object, or its JSON text)",
                param=f"{param}.value",
            ) from exc
    if not isinstance(schema, dict):
        raise InvalidInput("the value must be a JSON Schema object", param=f"{param}.value")
    validator_class = jsonschema.validators.validator_for(schema)
    try:
        validator_class.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise InvalidInput(f"invalid JSON Schema: {exc.message}", param=f"{param}.value") from exc
    except (ValueError, TypeError, LookupError, RecursionError) as exc:  # a schema too odd to check
        raise InvalidInput(f"invalid JSON Schema ({exc})", param=f"{param}.value") from exc
    return _replace(assertion, value=schema, compiled=validator_class(schema))


def _json_path_value(assertion: Assertion, param: str) -> Assertion:
    if assertion.path is None:
        raise InvalidInput(
            "a 'json-path' assertion needs a path, e.g. '$.items[0].name'", param=f"{param}.path"
        )
    try:
        compiled = parse_json_path(assertion.path)
    except Exception as exc:  # the parser's errors are of many kinds; any is a bad path
        if not isinstance(exc, JsonPathLexerError | JsonPathParserError):
            log.info("JSONPath %r refused: %r", assertion.path, exc)
        raise InvalidInput(f"invalid JSONPath: {exc}", param=f"{param}.path") from exc
    return _replace(assertion, compiled=compiled)


def _similar_value(assertion: Assertion, param: str) -> Assertion:
    values = assertion.value
    if isinstance(values, str) and values:
        values = [values]
    if (
        not isinstance(values, list)
        or not values
        or len(values) > MAX_VALUE_LIST
        or any(not isinstance(v, str) or not v for v in values)
    ):
        raise InvalidInput(
            "a 'similar' assertion needs a string or a list of strings as its value",
            param=f"{param}.value",
        )
    return _unit_threshold(_replace(assertion, value=values), param, SIMILAR_THRESHOLD)


def _unit_threshold(assertion: Assertion, param: str, default: float) -> Assertion:
    threshold = default if assertion.threshold is None else assertion.threshold
    if threshold > 1:
        raise InvalidInput("the threshold must be between 0 and 1", param=f"{param}.threshold")
    return _replace(assertion, threshold=threshold)


def _rouge_value(assertion: Assertion, param: str) -> Assertion:
    return _unit_threshold(_text_value(assertion, param), param, ROUGE_THRESHOLD)


def _levenshtein_value(assertion: Assertion, param: str) -> Assertion:
    assertion = _text_value(assertion, param)
    if assertion.threshold is None:
        return _replace(assertion, threshold=LEVENSHTEIN_THRESHOLD)
    return assertion


def _required_threshold(unit: str) -> Callable[[Assertion, str], Assertion]:
    def prepare(assertion: Assertion, param: str) -> Assertion:
        if assertion.threshold is None:
            raise InvalidInput(
                f"a '{assertion.type}' assertion needs a threshold ({unit})",
                param=f"{param}.threshold",
            )
        return assertion

    return prepare


def _rubric_value(assertion: Assertion, param: str) -> Assertion:
    assertion = _text_value(assertion, param)
    if assertion.base == "llm-rubric" and assertion.threshold is not None:
        return _unit_threshold(assertion, param, RUBRIC_PASS_SCORE)
    return assertion


# ---- deterministic checks -----------------------------------------------------------------------


def _quoted(value: str, limit: int = 80) -> str:
    return json.dumps(value if len(value) <= limit else value[:limit] + "…", ensure_ascii=False)


def _equals(a: Assertion, out: Output) -> _Fact:
    if isinstance(a.value, dict | list):
        try:
            parsed = orjson.loads(out.text)
        except orjson.JSONDecodeError:
            return _Fact(False, "the output is not JSON, so it cannot equal the expected value")
        same = json_equal(parsed, a.value)
        return _Fact(same, f"the output's JSON {'equals' if same else 'differs from'} the value")
    expected = _as_text(a.value)
    same = out.text == expected
    return _Fact(same, f"the output {'equals' if same else 'does not equal'} {_quoted(expected)}")


def _contains(a: Assertion, out: Output) -> _Fact:
    found = a.value in out.text
    return _Fact(
        found, f"the output {'contains' if found else 'does not contain'} {_quoted(a.value)}"
    )


def _icontains(a: Assertion, out: Output) -> _Fact:
    found = a.value.lower() in out.text.lower()
    verb = "contains" if found else "does not contain"
    return _Fact(found, f"the output {verb} {_quoted(a.value)} (ignoring case)")


def _containing(any_of: bool, fold: bool) -> Callable[[Assertion, Output], _Fact]:
    def check(a: Assertion, out: Output) -> _Fact:
        text = out.text.lower() if fold else out.text
        present = [v for v in a.value if (v.lower() if fold else v) in text]
        missing = [v for v in a.value if v not in present]
        if any_of:
            holds = bool(present)
            reason = (
                f"the output contains {_quoted(present[0])}"
                if holds
                else "the output contains none of the values"
            )
        else:
            holds = not missing
            reason = (
                "the output contains every value"
                if holds
                else f"the output lacks {', '.join(_quoted(m) for m in missing[:5])}"
            )
        return _Fact(holds, reason + (" (ignoring case)" if fold else ""))

    return check


def _starts_with(a: Assertion, out: Output) -> _Fact:
    holds = out.text.startswith(a.value)
    return _Fact(
        holds, f"the output {'starts' if holds else 'does not start'} with {_quoted(a.value)}"
    )


def _regex(a: Assertion, out: Output) -> _Fact:
    try:
        match = a.compiled.search(out.text, timeout=REGEX_TIMEOUT_SECONDS)
    except TimeoutError as exc:
        raise GradingError(
            f"the regular expression ran longer than {REGEX_TIMEOUT_SECONDS:g} s on the output"
        ) from exc
    holds = match is not None
    return _Fact(holds, f"the output {'matches' if holds else 'does not match'} /{a.value}/")


def _conforms(a: Assertion, document: Any) -> str | None:
    """None when `document` conforms to the assertion's schema (or it has none), else why not."""
    if a.compiled is None:
        return None
    error = jsonschema.exceptions.best_match(a.compiled.iter_errors(document))
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path) or "the top level"
    return f"at {where}: {error.message}"


def _is_json(a: Assertion, out: Output) -> _Fact:
    try:
        document = orjson.loads(out.text)
    except orjson.JSONDecodeError:
        return _Fact(False, "the output is not valid JSON")
    problem = _conforms(a, document)
    if problem is not None:
        return _Fact(False, f"the output is JSON that does not conform to the schema ({problem})")
    return _Fact(
        True, "the output is valid JSON" + (" conforming to the schema" if a.value else "")
    )


def _contains_json(a: Assertion, out: Output) -> _Fact:
    found = json_values_in(out.text)
    if not found:
        return _Fact(False, "the output contains no JSON object or array")
    problem = None
    for document in found:
        problem = _conforms(a, document)
        if problem is None:
            suffix = " conforming to the schema" if a.value else ""
            return _Fact(True, f"the output contains JSON{suffix}")
    return _Fact(False, f"the output's JSON does not conform to the schema ({problem})")


def _json_path(a: Assertion, out: Output) -> _Fact:
    try:
        document = orjson.loads(out.text)
    except orjson.JSONDecodeError:
        return _Fact(False, f"the output is not JSON, so {a.path} matches nothing")
    expression: JSONPath = a.compiled
    matches = [m.value for m in expression.find(document)]
    if a.value is None:
        holds = bool(matches)
        return _Fact(holds, f"{a.path} {'matches' if holds else 'matches nothing'} in the output")
    holds = any(json_equal(m, a.value) for m in matches)
    if holds:
        return _Fact(True, f"{a.path} is {_short_json(a.value)}")
    if not matches:
        return _Fact(False, f"{a.path} matches nothing in the output")
    return _Fact(False, f"{a.path} is {_short_json(matches[0])}, not {_short_json(a.value)}")


def _short_json(value: Any) -> str:
    text = orjson.dumps(value).decode()
    return text if len(text) <= 80 else text[:80] + "…"


def _levenshtein(a: Assertion, out: Output) -> _Fact:
    distance = Levenshtein.distance(out.text, a.value)
    assert a.threshold is not None
    holds = distance <= a.threshold
    relation = "within" if holds else "beyond"
    return _Fact(holds, f"edit distance {distance} is {relation} {a.threshold:g}")


def _rouge_n(a: Assertion, out: Output) -> _Fact:
    score = rouge_n(out.text, a.value)
    assert a.threshold is not None
    holds = score >= a.threshold
    relation = "at least" if holds else "below"
    return _Fact(holds, f"ROUGE-1 recall {score:.2f} is {relation} {a.threshold:g}", score)


def _latency(a: Assertion, out: Output) -> _Fact:
    assert a.threshold is not None
    holds = out.latency_ms <= a.threshold
    relation = "within" if holds else "over"
    return _Fact(holds, f"latency {out.latency_ms} ms is {relation} {a.threshold:g} ms")


def _cost(a: Assertion, out: Output) -> _Fact:
    if out.cost_usd is None:
        raise GradingError("the call's cost is unknown (the model has no price)")
    assert a.threshold is not None
    holds = out.cost_usd <= a.threshold
    relation = "within" if holds else "over"
    return _Fact(holds, f"cost ${out.cost_usd:.6f} is {relation} ${a.threshold:g}")


# ---- graded with models -----------------------------------------------------------------------

RUBRIC_SYSTEM = (
    "You grade the output of an AI system against a rubric. The output passes when what the "
    "rubric asks for holds of it. Answer with one JSON object and nothing else: "
    '{"reason": "<one or two sentences>", "pass": true or false, '
    '"score": <a number from 0.0 (fails completely) to 1.0 (fully meets the rubric)>}'
)

CLOSEDQA_SYSTEM = (
    "You assess a submitted answer to a task against a criterion. Reason step by step about "
    "whether the submission meets the criterion, then write a last line holding only the "
    "letter Y (it meets the criterion) or N (it does not)."
)


async def _llm_rubric(a: Assertion, out: Output, grader: Grader) -> _Fact:
    messages = [
        {"role": "system", "content": RUBRIC_SYSTEM},
        {
            "role": "user",
            "content": f"<Output>\n{out.text}\n</Output>\n<Rubric>\n{a.value}\n</Rubric>",
        },
    ]
    judged = await grader.judge(a.provider, messages)
    verdict = read_rubric_answer(judged.text)
    passed, score, reason = verdict
    if score is None:
        score = 1.0 if passed else 0.0
    if passed is None:
        passed = score >= (a.threshold if a.threshold is not None else RUBRIC_PASS_SCORE)
    elif a.threshold is not None:
        passed = passed and score >= a.threshold
    return _Fact(
        passed,
        reason or ("the judge passed it" if passed else "the judge failed it"),
        score,
        judged.tokens,
    )


async def _closedqa(a: Assertion, out: Output, grader: Grader) -> _Fact:
    content = (
        f"[Task]: {out.task}\n***\n[Submission]: {out.text}\n***\n[Criterion]: {a.value}\n***\n"
        "Does the submission meet the criterion?"
    )
    messages = [
        {"role": "system", "content": CLOSEDQA_SYSTEM},
        {"role": "user", "content": content},
    ]
    judged = await grader.judge(a.provider, messages)
    lines = [line.strip().strip("*\"'.`").strip() for line in judged.text.splitlines()]
    lines = [line for line in lines if line]
    last = lines[-1].upper() if lines else ""
    if last not in ("Y", "N"):
        raise GradingError(
            "the judge's answer does not end with a line holding Y or N: "
            + _quoted(judged.text, 200)
        )
    return _Fact(last == "Y", _clip(judged.text), None, judged.tokens)


async def _similar(a: Assertion, out: Output, grader: Grader) -> _Fact:
    embedded = await grader.embed(a.provider, [out.text, *a.value])
    if len(embedded.vectors) != len(a.value) + 1:
        raise GradingError("the embedding model returned fewer vectors than texts")
    first, *others = embedded.vectors
    similarities = [cosine(first, other) for other in others]
    best = max(similarities)
    assert a.threshold is not None
    holds = best >= a.threshold
    relation = "at least" if holds else "below"
    return _Fact(
        holds, f"similarity {best:.2f} is {relation} {a.threshold:g}", best, embedded.tokens
    )


def read_rubric_answer(text: str) -> tuple[bool | None, float | None, str]:
    """A judge's JSON answer `{pass, score, reason}`; `GradingError` when it is not one."""
    found = [v for v in json_values_in(text) if isinstance(v, dict)]
    answer = next((v for v in found if "pass" in v or "score" in v), None)
    if answer is None:
        raise GradingError(
            "the judge did not answer with a JSON object holding pass and score: "
            + _quoted(text, 200)
        )
    passed = answer.get("pass")
    if passed is not None and not isinstance(passed, bool):
        raise GradingError(f"the judge's 'pass' is not a boolean: {_short_json(passed)}")
    score = answer.get("score")
    if score is not None:
        if isinstance(score, bool) or not isinstance(score, int | float):
            raise GradingError(f"the judge's 'score' is not a number: {_short_json(score)}")
        if not 0 <= score <= 1:
            raise GradingError(f"the judge's 'score' {score} is not between 0 and 1")
        score = float(score)
    reason = answer.get("reason")
    return passed, score, _clip(reason) if isinstance(reason, str) else ""


def _clip(text: str) -> str:
    return text if len(text) <= _REASON_MAX else text[:_REASON_MAX] + "…"


# ---- the registry -----------------------------------------------------------------------------

Check = Callable[[Assertion, Output], _Fact]
ModelCheck = Callable[[Assertion, Output, Grader], Awaitable[_Fact]]


@dataclass(frozen=True, slots=True)
class Spec:
    """How an assertion type is checked when saved, and graded."""

    prepare: Callable[[Assertion, str], Assertion]
    check: Check | None = None
    model_check: ModelCheck | None = None


SPECS: dict[str, Spec] = {
    "equals": Spec(_any_value, _equals),
    "contains": Spec(_text_value, _contains),
    "icontains": Spec(_text_value, _icontains),
    "contains-any": Spec(_list_value, _containing(any_of=True, fold=False)),
    "contains-all": Spec(_list_value, _containing(any_of=False, fold=False)),
    "icontains-any": Spec(_list_value, _containing(any_of=True, fold=True)),
    "icontains-all": Spec(_list_value, _containing(any_of=False, fold=True)),
    "starts-with": Spec(_text_value, _starts_with),
    "regex": Spec(_regex_value, _regex),
    "is-json": Spec(_schema_value, _is_json),
    "contains-json": Spec(_schema_value, _contains_json),
    "json-path": Spec(_json_path_value, _json_path),
    "levenshtein": Spec(_levenshtein_value, _levenshtein),
    "rouge-n": Spec(_rouge_value, _rouge_n),
    "latency": Spec(_required_threshold("milliseconds"), _latency),
    "cost": Spec(_required_threshold("US dollars"), _cost),
    "similar": Spec(_similar_value, model_check=_similar),
    "llm-rubric": Spec(_rubric_value, model_check=_llm_rubric),
    "model-graded-closedqa": Spec(_rubric_value, model_check=_closedqa),
}

JUDGED = frozenset({"llm-rubric", "model-graded-closedqa"})


async def grade(assertion: Assertion, output: Output, grader: Grader) -> Verdict:
    """The verdict of one assertion on `output` (model-graded ones call `grader`)."""
    spec = SPECS[assertion.base]
    try:
        if spec.check is not None:
            fact = spec.check(assertion, output)
        else:
            assert spec.model_check is not None
            fact = await spec.model_check(assertion, output, grader)
    except GradingError as exc:
        return _errored(assertion, str(exc))
    except Cancelled:
        raise  # the job was cancelled before a judge call: no verdict at all
    except Exception as exc:  # e.g. a schema whose `$ref` cannot be resolved
        log.warning("assertion %s could not be graded: %r", assertion.type, exc)
        return _errored(assertion, f"the assertion could not be graded ({type(exc).__name__})")
    passed = fact.holds != assertion.inverse
    if fact.score is None:
        score = 1.0 if passed else 0.0
    else:
        score = 1.0 - fact.score if assertion.inverse else fact.score
    return Verdict(
        type=assertion.type,
        passed=passed,
        score=score,
        reason=fact.reason,
        weight=assertion.weight,
        metric=assertion.metric,
        tokens=fact.tokens,
    )


def _errored(assertion: Assertion, message: str) -> Verdict:
    return Verdict(
        type=assertion.type,
        passed=False,
        score=0.0,
        reason=message,
        weight=assertion.weight,
        metric=assertion.metric,
        error=message,
    )


def errored(assertion: Assertion, message: str) -> Verdict:
    """The verdict of an assertion that could not be graded at all (e.g. no judge model)."""
    return _errored(assertion, message)


@dataclass(frozen=True, slots=True)
class CaseScore:
    """A case's outcome from its verdicts: the weighted mean score and whether it passes."""

    passed: bool
    score: float
    errored: bool
    reason: str
    verdicts: list[Verdict] = field(default_factory=list)


def score_case(verdicts: Sequence[Verdict], threshold: float | None = None) -> CaseScore:
    """promptfoo's rule: the score is the weighted mean of the verdicts' scores; the case
    passes when every assertion passes or, with a `threshold`, when the score reaches it. An
    errored verdict never passes the case."""
    if not verdicts:
        return CaseScore(True, 1.0, False, "no assertions", [])
    total = sum(v.weight for v in verdicts)
    score = sum(v.score * v.weight for v in verdicts) / total if total > 0 else 0.0
    errors = [v for v in verdicts if v.error is not None]
    if errors:
        return CaseScore(False, score, True, f"{errors[0].type}: {errors[0].error}", list(verdicts))
    if threshold is not None:
        passed = score >= threshold
        relation = "≥" if passed else "<"
        reason = f"score {score:.2f} {relation} threshold {threshold:g}"
    else:
        failed = [v for v in verdicts if not v.passed]
        passed = not failed
        reason = "every assertion passed" if passed else f"{failed[0].type}: {failed[0].reason}"
    return CaseScore(passed, score, False, reason, list(verdicts))


# ---- helpers --------------------------------------------------------------------------------


def json_equal(left: Any, right: Any) -> bool:
    """JSON equality: numbers by value, but a boolean is never a number."""
    if isinstance(left, bool) or isinstance(right, bool):
        return isinstance(left, bool) and isinstance(right, bool) and left == right
    if isinstance(left, int | float) and isinstance(right, int | float):
        return left == right
    if isinstance(left, dict) and isinstance(right, dict):
        return left.keys() == right.keys() and all(json_equal(left[k], right[k]) for k in left)
    if isinstance(left, list) and isinstance(right, list):
        return len(left) == len(right) and all(
            json_equal(a, b) for a, b in zip(left, right, strict=True)
        )
    return type(left) is type(right) and left == right


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_no_constants)
_STARTS = re.compile(r"[\[{]")


def json_values_in(text: str) -> list[Any]:
    """The JSON objects and arrays found in `text`, in order (prose and code fences around
    them are skipped)."""
    found: list[Any] = []
    position = 0
    tries = 0
    while tries < _JSON_SCAN_MAX:
        start = _STARTS.search(text, position)
        if start is None:
            break
        tries += 1
        try:
            value, end = _DECODER.raw_decode(text, start.start())
        except ValueError:
            position = start.start() + 1
            continue
        found.append(value)
        position = end
    return found


_TOKEN = re.compile(r"\w+|[^\w\s]")


def rouge_n(candidate: str, reference: str, n: int = 1) -> float:
    """ROUGE-N recall: the share of the reference's n-grams found in the candidate."""

    def grams(text: str) -> Counter[tuple[str, ...]]:
        tokens = _TOKEN.findall(text)
        return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))

    wanted = grams(reference)
    if not wanted:
        return 0.0
    found = grams(candidate)
    return sum(min(count, found[gram]) for gram, count in wanted.items()) / sum(wanted.values())


def cosine(left: Sequence[float], right: Sequence[float]) -> float:
    """The cosine similarity of two vectors (0 when either is all zeros)."""
    if len(left) != len(right):
        raise GradingError("the embeddings have different dimensions")
    dot = sum(a * b for a, b in zip(left, right, strict=True))
    norms = math.sqrt(sum(a * a for a in left)) * math.sqrt(sum(b * b for b in right))
    return dot / norms if norms else 0.0

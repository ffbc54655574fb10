"""Checks of a workflow definition on save, beyond each step's own fields: unique names,
references only to earlier steps, `go_to_step` targets that exist, and the models, prompts,
external APIs and knowledge bases the steps name. Each error names the step and field."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from app.core.errors import InvalidInput
from app.workflows.definition import (
    ChatCompletionStep,
    ConditionalStep,
    CragScoringStep,
    GoToStep,
    HttpRequestStep,
    KnowledgeBaseSearchStep,
    MapStep,
    ParallelStep,
    Step,
)
from app.workflows.references import references

# Fields whose text is never resolved: the step's identity, its policies and its schema.
_NOT_RESOLVED = frozenset(
    {"name", "type", "description", "output_schema", "retry", "on_error", "default"}
)


@dataclass(frozen=True, slots=True)
class Placed:
    """A step with the field name of where it sits (`steps[1].branches.a[0]`)."""

    step: Step
    param: str
    in_map: bool


def walk(steps: list[Step], param: str = "steps", in_map: bool = False) -> Iterator[Placed]:
    """Every step of a definition, nested ones included, each with where it sits."""
    for index, step in enumerate(steps):
        where = f"{param}[{index}]"
        yield Placed(step, where, in_map)
        if isinstance(step, ParallelStep):
            for branch, inner in step.branches.items():
                yield from walk(inner, f"{where}.branches.{branch}", in_map)
        elif isinstance(step, MapStep):
            yield from walk(step.steps, f"{where}.steps", True)


def check_structure(steps: list[Step]) -> None:
    """Unique names, references to earlier steps only, and `go_to_step` within reach."""
    seen: dict[str, str] = {}
    for placed in walk(steps):
        name = placed.step.name
        if name in seen:
            raise InvalidInput(
                f"{placed.param}.name: the name '{name}' is taken by {seen[name]}",
                param=f"{placed.param}.name",
            )
        seen[name] = placed.param
    _check_sequence(steps, "steps", frozenset(), in_map=False)


def _fields(step: Step) -> dict[str, Any]:
    dumped = step.model_dump(exclude=set(_NOT_RESOLVED))
    if isinstance(step, ParallelStep):
        dumped.pop("branches", None)
    if isinstance(step, MapStep):
        dumped.pop("steps", None)
    return dumped


def _check_sequence(
    steps: list[Step], param: str, visible: frozenset[str], *, in_map: bool
) -> None:
    names = {s.name for s in steps}
    earlier = set(visible)
    for index, step in enumerate(steps):
        where = f"{param}[{index}]"
        for field, ref in references(_fields(step)):
            at = f"{where}.{field}"
            if ref.source == "item" and not in_map:
                raise InvalidInput(f"{at}: {ref.text} is only allowed inside a map", param=at)
            if ref.source == "step" and ref.name not in earlier:
                why = "itself" if ref.name == step.name else "no earlier step of that name"
                raise InvalidInput(
                    f"{at}: {ref.text} refers to {why}; a step reads the steps before it",
                    param=at,
                )
        if isinstance(step, ConditionalStep):
            actions = [
                (f"{where}.conditions[{i}].action", c.action) for i, c in enumerate(step.conditions)
            ]
            actions.append((f"{where}.default_action", step.default_action))
            for at, action in actions:
                if isinstance(action, GoToStep) and action.go_to_step not in names:
                    raise InvalidInput(
                        f"{at}.go_to_step: no step '{action.go_to_step}' in this sequence",
                        param=f"{at}.go_to_step",
                    )
        if isinstance(step, ParallelStep):
            for branch, inner in step.branches.items():
                _check_sequence(
                    inner, f"{where}.branches.{branch}", frozenset(earlier), in_map=in_map
                )
        elif isinstance(step, MapStep):
            _check_sequence(step.steps, f"{where}.steps", frozenset(earlier), in_map=True)
        earlier.add(step.name)


@dataclass(frozen=True, slots=True)
class Needed:
    """One thing a step names that must exist: its kind, its id, and the field naming it."""

    kind: str  # model, prompt, external API, credential, knowledge base
    id: str
    param: str


def needed(steps: list[Step]) -> Iterator[Needed]:
    """The models, prompts, external APIs, credentials and knowledge bases the steps name."""
    for placed in walk(steps):
        step, at = placed.step, placed.param
        if isinstance(step, ChatCompletionStep | CragScoringStep):
            yield Needed("model", step.model_id, f"{at}.model_id")
        if isinstance(step, ChatCompletionStep) and step.prompt_id is not None:
            yield Needed("prompt", step.prompt_id, f"{at}.prompt_id")
        if isinstance(step, HttpRequestStep):
            yield Needed("external API", step.external_api_id, f"{at}.external_api_id")
            if step.credential_id is not None:
                yield Needed("credential", step.credential_id, f"{at}.credential_id")
        if isinstance(step, KnowledgeBaseSearchStep):
            yield Needed("knowledge base", step.knowledge_base_id, f"{at}.knowledge_base_id")


Exists = Callable[[Needed], Awaitable[bool]]


async def check_references_exist(steps: list[Step], exists: Exists) -> None:
    """Refuse the first model, prompt, external API, credential or knowledge base that
    `exists` does not know, naming the step's field."""
    for item in needed(steps):
        if not await exists(item):
            raise InvalidInput(f"{item.param}: {item.kind} '{item.id}' not found", param=item.param)

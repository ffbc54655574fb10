"""`chat_completion`: one chat call through `GatewayCalls`, for the run's caller."""

from __future__ import annotations

import contextlib
from typing import Any

import orjson
from pydantic import ValidationError

from app.core.errors import InvalidInput
from app.gateway.calls import Spent
from app.gateway.schemas import ChatCompletionRequest
from app.workflows.definition import ChatCompletionStep
from app.workflows.references import as_text
from app.workflows.steps.base import StepEnv, StepResult


def _variable(value: Any) -> str | int | float | bool | None:
    """A prompt variable's value as prompts take it: objects and arrays as JSON text."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return as_text(value)


def request_of(step: ChatCompletionStep, env: StepEnv) -> dict[str, Any]:
    """The chat request the step makes, its references resolved."""
    messages: list[dict[str, Any]] = []
    if step.system_message is not None:
        messages.append({"role": "system", "content": as_text(env.resolve(step.system_message))})
    if step.messages:
        messages.extend(env.resolve(step.messages))
    if step.prompt_id is not None:
        prompt: dict[str, Any] = {
            "role": "user",
            "prompt_id": step.prompt_id,
            "variables": {k: _variable(env.resolve(v)) for k, v in step.prompt_variables.items()},
        }
        if step.prompt_label is not None:
            prompt["prompt_label"] = step.prompt_label
        if step.prompt_version is not None:
            prompt["prompt_version"] = step.prompt_version
        messages.append(prompt)
    if step.user_message is not None:
        messages.append({"role": "user", "content": as_text(env.resolve(step.user_message))})
    body: dict[str, Any] = {"model": step.model_id, "messages": messages}
    for name in ("temperature", "max_tokens", "top_p", "response_format"):
        value = getattr(step, name)
        if value is not None:
            body[name] = value
    return body


async def execute(step: ChatCompletionStep, env: StepEnv) -> StepResult:
    body = request_of(step, env)
    try:
        request = ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        field = ".".join(str(p) for p in first["loc"])
        raise InvalidInput(f"the step's chat request is invalid: {field}: {first['msg']}") from None
    completion = await env.deps.calls.complete(env.caller, request, env.context)
    await completion.settle()
    answer = completion.body
    choice = (answer.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    content = message.get("content")
    usage = answer.get("usage") or {}
    output: dict[str, Any] = {
        "content": content,
        "model": completion.model_id,
        "finish_reason": choice.get("finish_reason"),
        "usage": usage,
    }
    if message.get("tool_calls"):
        output["tool_calls"] = message["tool_calls"]
    if isinstance(content, str) and content.lstrip()[:1] in ("{", "["):
        with contextlib.suppress(orjson.JSONDecodeError):
            output["parsed"] = orjson.loads(content)
    return StepResult(
        output=output,
        input=body,
        spent=Spent.of(answer, completion.headers),
    )

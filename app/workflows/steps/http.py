"""`http_request`: a request to an external API through the SSRF-guarded `OutboundClient`.

The URL is the API's base URL and the step's path, and must stay on the base URL's host; the
headers are the API's own, then its credential's (the step's `credential_id` first), then the
step's. The record keeps the method, URL and body sent, never a header's value.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any
from urllib.parse import urlencode

import httpx
import orjson

from app.core.errors import InvalidInput, Transient
from app.core.outbound import ForbiddenDestination
from app.credentials.schemas import SECRET_MARK
from app.storage.reads import read_existing
from app.workflows.definition import HttpRequestStep
from app.workflows.entities import ExternalApi
from app.workflows.references import as_text
from app.workflows.steps.base import StepEnv, StepResult

DEFAULT_TIMEOUT_MS = 30_000
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
_ERROR_BODY_CHARS = 200
_SEGMENT = re.compile(r"\.([A-Za-z0-9_-]+)|\[(\d+|\*)\]")


class HttpStepFailed(InvalidInput):
    """The API answered with an error status that another attempt would not change."""

    code = "http_request_failed"


class HttpStepUnavailable(Transient):
    """The API answered 429 or 5xx."""

    code = "http_request_unavailable"


def extract(value: Any, path: str | None) -> Any:
    """The part of `value` at a JSONPath-like `path` (`$.a.b[0]`, `$.items[*].id`), or None."""
    if path is None:
        return None
    if not path.startswith("$"):
        raise InvalidInput(f"extract_path must start with $: {path}", param="extract_path")
    rest = path[1:]
    values, fanned = [value], False
    position = 0
    while position < len(rest):
        match = _SEGMENT.match(rest, position)
        if match is None:
            raise InvalidInput(f"extract_path cannot be read at '{rest[position:]}'")
        key, index = match.group(1), match.group(2)
        found: list[Any] = []
        for current in values:
            if key is not None and isinstance(current, dict) and key in current:
                found.append(current[key])
            elif index == "*" and isinstance(current, list):
                found.extend(current)
                fanned = True
            elif index not in (None, "*") and isinstance(current, list):
                number = int(index)
                if number < len(current):
                    found.append(current[number])
        values = found
        position = match.end()
    if fanned:
        return values
    return values[0] if values else None


async def execute(step: HttpRequestStep, env: StepEnv) -> StepResult:
    api = await read_existing(
        env.deps.storage, ExternalApi, step.external_api_id, "external API", param="external_api_id"
    )
    if not api.enabled:
        raise InvalidInput(f"external API '{api.id}' is disabled", param="external_api_id")
    path = as_text(env.resolve(step.path))
    url = api.base_url.rstrip("/") + ("/" + path.lstrip("/") if path else "")
    query = {k: as_text(v) for k, v in env.resolve(step.query).items()}
    if query:
        url += ("&" if "?" in url else "?") + urlencode(query)
    try:
        same_host = httpx.URL(url).host == httpx.URL(api.base_url).host
    except httpx.InvalidURL as exc:
        raise InvalidInput(f"'{url}' is not a valid URL", param="path") from exc
    if not same_host:
        raise ForbiddenDestination(f"the path leads off the host of external API '{api.id}'")
    headers: dict[str, str] = dict(api.base_headers)
    credential_id = step.credential_id or api.credential_id
    if credential_id is not None:
        credential = await env.deps.credentials.reveal(credential_id)
        headers.update(credential.auth_headers("Authorization", f"Bearer {SECRET_MARK}"))
    headers.update({k: as_text(env.resolve(v)) for k, v in step.headers.items()})
    body = env.resolve(step.body)
    content: bytes | None = None
    if isinstance(body, str):
        content = body.encode()
    elif body is not None:
        content = orjson.dumps(body)
        if not any(k.lower() == "content-type" for k in headers):
            headers["content-type"] = "application/json"
    timeout = (step.timeout_ms or DEFAULT_TIMEOUT_MS) / 1000
    sent = {"method": step.method, "url": url, "body": body}
    response = await env.deps.outbound.request(
        step.method,
        url,
        content=content,
        headers=headers,
        timeout=timeout,
        follow_redirects=step.follow_redirects,
        max_response_bytes=MAX_RESPONSE_BYTES,
    )
    answer: Any = response.text()
    if "json" in response.headers.get("content-type", "") and response.body:
        with contextlib.suppress(orjson.JSONDecodeError):
            answer = orjson.loads(response.body)
    success = 200 <= response.status_code < 300
    if step.fail_on_error and not success:
        shown = response.text()[:_ERROR_BODY_CHARS]
        message = f"the API answered HTTP {response.status_code}: {shown}"
        if response.status_code == 429 or response.status_code >= 500:
            raise HttpStepUnavailable(message)
        raise HttpStepFailed(message)
    output = {
        "status_code": response.status_code,
        "success": success,
        "body": answer,
        "extracted": extract(answer, step.extract_path),
    }
    return StepResult(output=output, input=sent)

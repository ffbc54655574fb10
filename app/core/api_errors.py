"""Render every error the API answers with as the OpenAI error body."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.core.error_status import domain_status, error_type
from app.core.errors import DomainError, RateLimited, Unavailable, UpstreamRateLimited
from app.core.jsonvalues import escaped

logger = logging.getLogger(__name__)

UNAVAILABLE_RETRY_AFTER_SECONDS = 1

# Codes for HTTP errors raised by the framework rather than the domain.
_HTTP_CODES = {404: "unknown_url", 405: "method_not_allowed", 413: "request_too_large"}
_MAX_LISTED_ERRORS = 3


def error_body(
    message: str, type_: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """`{"error": {"message", "type", "param", "code"}}`."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    *,
    type_: str | None = None,
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """A JSON response carrying the OpenAI error body."""
    body = error_body(message, type_ or error_type(status), param=param, code=code)
    return JSONResponse(body, status_code=status, headers=headers)


async def _domain_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, DomainError)
    return domain_error_response(exc, request.method, request.url.path)


def domain_error_response(exc: DomainError, method: str, path: str) -> JSONResponse:
    """The response to a domain error raised while serving `method path` (also used by the
    layers that answer below FastAPI's exception handlers)."""
    status, type_ = domain_status(exc)
    headers = None
    if isinstance(exc, RateLimited | UpstreamRateLimited):
        # `retry-after` must be whole seconds; the OpenAI SDK prefers the precise `-ms` variant.
        headers = {
            "retry-after": str(max(1, math.ceil(exc.retry_after))),
            "retry-after-ms": str(max(0, round(exc.retry_after * 1000))),
        }
        # The gateway's own limits also say which limit was hit (`x-ratelimit-*`).
        extra = exc.details.get("headers")
        if isinstance(extra, dict):
            headers.update({str(k): str(v) for k, v in extra.items()})
    elif isinstance(exc, Unavailable):
        # A dependency is down: worth another try shortly (the OpenAI SDK honours this).
        headers = {"retry-after": str(UNAVAILABLE_RETRY_AFTER_SECONDS)}
    if status >= 500:
        logger.warning("%s on %s %s: %s", type(exc).__name__, method, path, exc)
    return error_response(
        status, exc.message, type_=type_, param=exc.param, code=exc.code, headers=headers
    )


def _field(loc: Sequence[Any]) -> str | None:
    """`("body", "messages", 0, "content")` → `"messages.0.content"`."""
    parts = [escaped(str(p)) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:]
    return ".".join(parts) or None


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    if not errors:
        return error_response(400, "Invalid request.", code="invalid_request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "invalid JSON")
        return error_response(
            400,
            f"We could not parse the JSON body of your request ({detail}). "
            "Send valid JSON with `Content-Type: application/json`.",
            code="json_parse_error",
        )
    described = []
    for error in errors[:_MAX_LISTED_ERRORS]:
        field = _field(error.get("loc", ()))
        described.append(f"{field or 'request body'}: {error.get('msg', 'invalid value')}")
    if len(errors) > _MAX_LISTED_ERRORS:
        described.append(f"and {len(errors) - _MAX_LISTED_ERRORS} more")
    return error_response(
        400,
        "Invalid request: " + "; ".join(described),
        param=_field(first.get("loc", ())),
        code=str(first.get("type", "invalid_request")),
    )


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    if status in (204, 304) or status < 200:
        return Response(status_code=status, headers=exc.headers)
    try:
        default_detail = HTTPStatus(status).phrase
    except ValueError:
        default_detail = ""
    if exc.detail != default_detail:
        message = str(exc.detail)
    elif status == 404:
        message = f"Invalid URL ({request.method} {request.url.path})"
    elif status == 405:
        message = f"Method {request.method} is not allowed on {request.url.path}"
    else:
        message = default_detail or f"HTTP error {status}"
    code = _HTTP_CODES.get(status) or default_detail.lower().replace(" ", "_").replace("-", "_")
    return error_response(status, message, code=code or None, headers=exc.headers)


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    # Starlette re-raises after this response is sent, so the server logs the error again;
    # this line is the one that carries the request id.
    request_id = getattr(request.state, "request_id", None)
    return unexpected_error_response(request.method, request.url.path, request_id, exc)


def unexpected_error_response(
    method: str, path: str, request_id: str | None, exc: Exception
) -> JSONResponse:
    """Logs a bug met while serving `method path` and answers the 500 that reports it."""
    logger.error("unhandled error on %s %s (request id %s)", method, path, request_id, exc_info=exc)
    message = "The server had an error while processing your request."
    if request_id:
        message += f" Please include the request id {request_id} if you report it."
    headers = {"x-request-id": request_id} if request_id else None
    return error_response(500, message, type_="api_error", code="internal_error", headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Make every error the app answers with an OpenAI error body."""
    app.add_exception_handler(DomainError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)

"""Plain chat completions answered below FastAPI's per-request machinery.

Almost all traffic is `POST /v1/chat/completions` with a valid JSON body, and no query string
or just `?async=true`. For those, route matching over every route, dependency solving and body
validation through FastAPI cost about as much as the gateway's own work, so this ASGI layer
answers them itself: it validates the body with the same model, authenticates with the same
dependency function and calls the same `answer_directly` or `submit_job` the route calls.
Everything else — a body that does not validate, another query string, an `Idempotency-Key` on
a direct call, an oversized header, another path — goes on to the FastAPI app untouched, so its
errors and documentation stay in one place.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.access.deps import get_principal
from app.core.api_errors import domain_error_response
from app.core.errors import DomainError
from app.gateway.cache import CacheControl
from app.gateway.router import answer_directly, submit_job
from app.gateway.schemas import ChatCompletionRequest
from app.services import Services

PATH = "/v1/chat/completions"
ASYNC_QUERY = b"async=true"
# The route's header limits: longer values go to FastAPI, which answers them with a 400.
_MAX_CACHE_CONTROL = 200
_MAX_IDEMPOTENCY_KEY = 255


@dataclass(frozen=True, slots=True)
class _Headers:
    cache_control: str | None = None
    idempotency_key: str | None = None


def _fast_headers(scope: Scope, job: bool) -> _Headers | None:
    """The headers this layer reads, or None when FastAPI must answer the request."""
    json_body = False
    cache_control: str | None = None
    idempotency_key: str | None = None
    for name, value in scope["headers"]:
        if name == b"content-type":
            media = value.split(b";", 1)[0].strip().lower()
            json_body = media == b"application/json"
        elif name == b"idempotency-key":
            if not job or len(value) > _MAX_IDEMPOTENCY_KEY:
                return None  # only meaningful for jobs; FastAPI says so
            idempotency_key = value.decode("latin-1")
        elif name == b"cache-control":
            if len(value) > _MAX_CACHE_CONTROL:
                return None
            cache_control = value.decode("latin-1")
    return _Headers(cache_control, idempotency_key) if json_body else None


def _replay(
    chunks: list[bytes], end: Message | BaseException | None, receive: Receive
) -> Callable[[], Awaitable[Message]]:
    """A `receive` that gives the app the body already read, then what ended the reading
    early (a disconnect message, or the size limit's exception raised again)."""
    first: Message = {
        "type": "http.request",
        "body": b"".join(chunks),
        "more_body": end is not None,
    }
    pending = [first] if not isinstance(end, dict) else [first, end]

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        if isinstance(end, BaseException):
            raise end
        return await receive()

    return replayed


class ChatFastPath:
    """ASGI middleware answering plain chat completions (see the module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        query = scope.get("query_string")
        job = query == ASYNC_QUERY
        headers = _fast_headers(scope, job) if job or not query else None
        if headers is None:
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        try:
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    # The client left while sending: the app sees the same disconnect.
                    await self.app(scope, _replay(chunks, message, receive), send)
                    return
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    break
        except HTTPException as exc:  # the body size limit: FastAPI answers it with a 413
            await self.app(scope, _replay(chunks, exc, receive), send)
            return
        body = b"".join(chunks)
        try:
            request = ChatCompletionRequest.model_validate_json(body)
        except ValidationError:
            # FastAPI names the field in its 400 (or answers 401 first without a key).
            await self.app(scope, _replay(chunks, None, receive), send)
            return
        http = Request(scope, receive)
        services: Services = scope["app"].state.services
        try:
            principal = await get_principal(http, services)
            if job:
                response = await submit_job(
                    request, principal, services, headers.cache_control, headers.idempotency_key
                )
            else:
                response = await answer_directly(
                    request, principal, services, CacheControl.parse(headers.cache_control)
                )
        except DomainError as exc:
            response = domain_error_response(exc, "POST", PATH)
        await response(scope, receive, send)

"""Plain chat completions answered below FastAPI's per-request machinery.

Almost all traffic is `POST /v1/chat/completions` with a valid JSON body and no query string.
For those, route matching over every route, dependency solving and body validation through
FastAPI cost about as much as the gateway's own work, so this ASGI layer answers them itself:
it validates the body with the same model, authenticates with the same dependency function and
calls the same `answer_directly` the route calls. Everything else — a body that does not
validate, a query string (`?async=true`), an `Idempotency-Key`, an oversized header, another
path — goes on to the FastAPI app untouched, so its errors and documentation stay in one place.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.access.deps import get_principal
from app.core.api_errors import domain_error_response
from app.core.errors import DomainError
from app.gateway.cache import CacheControl
from app.gateway.router import answer_directly
from app.gateway.schemas import ChatCompletionRequest
from app.services import Services

PATH = "/v1/chat/completions"
# The route's header limits: longer values go to FastAPI, which answers them with a 400.
_MAX_CACHE_CONTROL = 200


def _fast_headers(scope: Scope) -> tuple[bool, str | None]:
    """Whether the headers let this layer answer, and the `Cache-Control` value."""
    json_body = False
    cache_control: str | None = None
    for name, value in scope["headers"]:
        if name == b"content-type":
            media = value.split(b";", 1)[0].strip().lower()
            json_body = media == b"application/json"
        elif name == b"idempotency-key":
            return False, None  # only meaningful for jobs; FastAPI checks its length
        elif name == b"cache-control":
            if len(value) > _MAX_CACHE_CONTROL:
                return False, None
            cache_control = value.decode("latin-1")
    return json_body, cache_control


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
        if (
            scope["type"] != "http"
            or scope["path"] != PATH
            or scope["method"] != "POST"
            or scope.get("query_string")
        ):
            await self.app(scope, receive, send)
            return
        usable, cache_control = _fast_headers(scope)
        if not usable:
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
            response = await answer_directly(
                request, principal, services, CacheControl.parse(cache_control)
            )
        except DomainError as exc:
            response = domain_error_response(exc, "POST", PATH)
        await response(scope, receive, send)

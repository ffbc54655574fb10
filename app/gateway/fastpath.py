"""Plain chat completions answered in front of FastAPI's middleware stack.

Almost all traffic is `POST /v1/chat/completions` with a valid JSON body, and no query string
or just `?async=true`. For those, the middleware stack, route matching over every route,
dependency solving and body validation through FastAPI cost about as much as the gateway's own
work, so `GatewayApp` hands them to `ChatFastPath` before any of it runs. The fast path does
what the stack would have done for such a request (a request id, the body size limit, the
OpenAI error bodies, a logged 500 for a bug), validates the body with the same model,
authenticates with the same service and calls the same `answer_directly` or `submit_job` the
route calls. Everything else — a body that does not validate or is too large, another query
string, an `Idempotency-Key` on a direct call, an oversized header — goes on to the FastAPI
stack untouched (the body already read is replayed), so its errors and documentation stay in
one place.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from pydantic import ValidationError
from starlette.responses import Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.access.deps import presented_key
from app.core.api_errors import domain_error_response, unexpected_error_response
from app.core.errors import DomainError, Unauthenticated
from app.core.middleware import REQUEST_ID_HEADER, new_request_id, request_id_var, sane_request_id
from app.gateway.cache import CacheControl
from app.gateway.router import answer_directly, submit_job
from app.gateway.schemas import ChatCompletionRequest
from app.services import Services

log = logging.getLogger(__name__)

PATH = "/v1/chat/completions"
ASYNC_QUERY = b"async=true"
# The route's header limits: longer values go to FastAPI, which answers them with a 400.
_MAX_CACHE_CONTROL = 200
_MAX_IDEMPOTENCY_KEY = 255
_REQUEST_ID_HEADER = REQUEST_ID_HEADER.encode()
# Sent by FastAPI's stack, which answers it with the route's 401.
MISSING_KEY = "API key required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"


@dataclass(frozen=True, slots=True)
class _Head:
    """What the fast path reads from the request's headers."""

    content_length: int | None = None
    cache_control: str | None = None
    idempotency_key: str | None = None
    request_id: str | None = None
    authorization: str | None = None
    api_key: str | None = None


def _fast_head(scope: Scope, job: bool) -> _Head | None:
    """The headers the fast path reads, or None when FastAPI must answer the request."""
    json_body = False
    content_length: int | None = None
    cache_control = idempotency_key = request_id = authorization = api_key = None
    for name, value in scope["headers"]:
        if name == b"content-type":
            media = value.split(b";", 1)[0].strip().lower()
            json_body = media == b"application/json"
        elif name == b"content-length":
            if not value.isdigit():
                return None
            content_length = int(value)
        elif name == b"authorization":
            authorization = value.decode("latin-1")
        elif name == b"x-api-key":
            api_key = value.decode("latin-1")
        elif name == b"x-request-id":
            request_id = sane_request_id(value.decode("latin-1"))
        elif name == b"idempotency-key":
            if not job or len(value) > _MAX_IDEMPOTENCY_KEY:
                return None  # only meaningful for jobs; FastAPI says so
            idempotency_key = value.decode("latin-1")
        elif name == b"cache-control":
            if len(value) > _MAX_CACHE_CONTROL:
                return None
            cache_control = value.decode("latin-1")
    if not json_body:
        return None
    return _Head(content_length, cache_control, idempotency_key, request_id, authorization, api_key)


def _replay(
    chunks: list[bytes], end: Message | None, receive: Receive
) -> Callable[[], Awaitable[Message]]:
    """A `receive` that gives the app the body already read, then the message that ended the
    reading early (a disconnect), or the rest of the body when the reading stopped at the limit."""
    first: Message = {
        "type": "http.request",
        "body": b"".join(chunks),
        "more_body": end is not None,
    }
    pending = [first] if end is None or end["type"] == "http.request" else [first, end]

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed


class ChatFastPath:
    """Answers plain chat completions; hands every other request to `stack` (FastAPI's)."""

    def __init__(self, app: FastAPI, stack: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.stack = stack
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        query = scope.get("query_string")
        job = query == ASYNC_QUERY
        head = _fast_head(scope, job) if job or not query else None
        if head is None or (head.content_length or 0) > self.max_bytes:
            await self.stack(scope, receive, send)  # the stack answers an oversized body 413
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                # The client left while sending: the stack sees the same disconnect.
                await self.stack(scope, _replay(chunks, message, receive), send)
                return
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            more = message.get("more_body", False)
            if size > self.max_bytes:
                await self.stack(scope, _replay(chunks, message if more else None, receive), send)
                return
            if not more:
                break
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        try:
            request = ChatCompletionRequest.model_validate_json(body)
        except ValidationError:
            # The stack names the field in its 400 (or answers 401 first without a key).
            await self.stack(scope, _replay(chunks, None, receive), send)
            return
        request_id = head.request_id or new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        token = request_id_var.set(request_id)
        try:
            await self._answer(scope, receive, send, request, head, job, request_id)
        finally:
            request_id_var.reset(token)

    async def _answer(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        request: ChatCompletionRequest,
        head: _Head,
        job: bool,
        request_id: str,
    ) -> None:
        id_header = (_REQUEST_ID_HEADER, request_id.encode())
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", ()), id_header]
            await send(message)

        services: Services = self.app.state.services
        try:
            try:
                secret = presented_key(head.authorization, head.api_key)
                if secret is None:
                    raise Unauthenticated(MISSING_KEY)
                principal = await services.keys.authenticate(secret)
                if job:
                    response = await submit_job(
                        request, principal, services, head.cache_control, head.idempotency_key
                    )
                else:
                    control = CacheControl.parse(head.cache_control)
                    response = await answer_directly(request, principal, services, control)
            except DomainError as exc:
                response = domain_error_response(exc, "POST", PATH)
            if isinstance(response, StreamingResponse):
                await response(scope, receive, send_with_id)
                return
            await _send_plain(response, send, id_header)
            started = True
            if response.background is not None:
                await response.background()
        except Exception as exc:
            # What the stack's last-resort handler does: logged once, with the request id.
            if started:
                log.exception("error on POST %s once answering (request id %s)", PATH, request_id)
                return
            error = unexpected_error_response("POST", PATH, request_id, exc)
            await _send_plain(error, send, None)


async def _send_plain(response: Response, send: Send, extra: tuple[bytes, bytes] | None) -> None:
    headers = response.raw_headers if extra is None else [*response.raw_headers, extra]
    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": response.body})


class GatewayApp(FastAPI):
    """FastAPI, with plain chat completions answered by `ChatFastPath` in front of its stack."""

    def __init__(self, *, max_request_bytes: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fast_path = ChatFastPath(self, super().__call__, max_request_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == PATH and scope["method"] == "POST":
            scope["app"] = self
            await self.fast_path(scope, receive, send)
            return
        await super().__call__(scope, receive, send)

"""Pure-ASGI middleware on the hot path: request ids, and the request body size limit.

The pieces each middleware is made of (`caller_request_id`, `tag_request`, `SendWithRequestId`,
`declared_length`, `BodyLimit`) are also what `app.fastpath` calls for the requests it answers
in front of the stack, so both apply the same rules.
"""

from __future__ import annotations

import os
import re
from contextvars import Token

from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.api_errors import error_response
from app.core.log_context import key_id_var, request_id_var

REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID_HEADER = REQUEST_ID_HEADER.encode()
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


def current_request_id() -> str | None:
    """The id of the request being served by this task, if any."""
    return request_id_var.get()


def sane_request_id(candidate: str) -> str | None:
    """The caller's request id when it is safe to echo and log, else None."""
    return candidate if _SANE_REQUEST_ID.fullmatch(candidate) else None


def new_request_id() -> str:
    # 128 random bits as hex, like a uuid4's, without building a UUID on every request.
    return f"req_{os.urandom(16).hex()}"


def caller_request_id(value: bytes) -> str | None:
    """The id an `x-request-id` header value gives, when it is safe to echo and log."""
    return sane_request_id(value.decode("latin-1"))


def _incoming_request_id(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            return caller_request_id(value)
    return None


def tag_request(scope: Scope, caller_id: str | None) -> tuple[str, Token[str | None]]:
    """Gives the request its id, the caller's if sane (`caller_request_id`) else a new one: in
    the scope's state (for error bodies) and in the log context until the returned token is
    reset, when the request is answered."""
    request_id = caller_id or new_request_id()
    scope.setdefault("state", {})["request_id"] = request_id
    return request_id, request_id_var.set(request_id)


class SendWithRequestId:
    """A `send` that echoes the request id on the response; `started` tells a caller catching
    an error whether the response has begun (then it can only be logged)."""

    __slots__ = ("header", "send", "started")

    def __init__(self, send: Send, request_id: str) -> None:
        self.send = send
        self.header = (_REQUEST_ID_HEADER, request_id.encode())
        self.started = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            message["headers"] = [*message.get("headers", ()), self.header]
        await self.send(message)

    async def whole(self, response: Response) -> None:
        """Sends a response held whole (not streamed), the id added to its headers: its two
        messages go straight to `send`, saving the fast path a call through `__call__` each."""
        self.started = True
        headers = [*response.raw_headers, self.header]
        await self.send(
            {"type": "http.response.start", "status": response.status_code, "headers": headers}
        )
        await self.send({"type": "http.response.body", "body": response.body})


class RequestIdMiddleware:
    """Tags each request with an id (the caller's if sane, else a new one) and echoes it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request_id, token = tag_request(scope, _incoming_request_id(scope))
        key_token = key_id_var.set(None)  # set once the request's key is authenticated
        try:
            await self.app(scope, receive, SendWithRequestId(send, request_id))
        finally:
            key_id_var.reset(key_token)
            request_id_var.reset(token)


def _too_large(limit: int) -> str:
    return f"The request body is larger than the limit of {limit} bytes."


class _BodyTooLarge(HTTPException):
    """Raised from `receive` so that the app stops reading and answers 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, _too_large(limit))


def declared_length(value: bytes) -> int | None:
    """The size a `Content-Length` value declares, when it is plain decimal digits; anything
    else declares nothing (the limit then applies to the bytes as they arrive)."""
    return int(value) if value.isdigit() else None


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return declared_length(value)
    return None


class BodyLimit:
    """The body size limit of one request: a body declared larger is refused before it is read,
    one that arrives larger as soon as it passes the limit."""

    __slots__ = ("max_bytes", "received")

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.received = 0

    def refuses_declared(self, content_length: int | None) -> bool:
        return content_length is not None and content_length > self.max_bytes

    def passed_by(self, chunk: bytes) -> bool:
        """Counts `chunk` of the body; whether the body received so far is over the limit."""
        self.received += len(chunk)
        return self.received > self.max_bytes


class BodySizeLimitMiddleware:
    """Answers 413 to a request whose body exceeds `max_bytes`, declared or streamed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = BodyLimit(self.max_bytes)
        if limit.refuses_declared(_content_length(scope)):
            response = error_response(413, _too_large(self.max_bytes), code="request_too_large")
            await response(scope, receive, send)
            return

        async def limited_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request" and limit.passed_by(message.get("body", b"")):
                raise _BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)

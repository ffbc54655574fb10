"""The two hot routes answered in front of FastAPI's middleware stack.

Almost all traffic is `POST /v1/chat/completions` with a valid JSON body (no query string, or
just `?async=true`) and `GET /v1/operations/{id}` (with at most `?wait=N`). For those, the
middleware stack, route matching over every route and dependency solving cost about as much
as the gateway's own work, so `GatewayApp` hands them to `FastPaths` before any of it runs.
A fast path does what the stack would have done for such a request (a request id, the body
size limit, the OpenAI error bodies, a logged 500 for a bug), validates the same way,
authenticates with the same service and calls the same function the route calls
(`answer_directly`, `submit_job`, `poll_response`). Everything else — a body that does not
validate or is too large, another query string, an `Idempotency-Key` on a direct call, an
oversized header — goes on to the FastAPI stack untouched (the body already read is
replayed), so its errors and documentation stay in one place.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from pydantic import ValidationError
from starlette.responses import Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.access.deps import required_key
from app.access.service import Principal
from app.core import tracing
from app.core.api_errors import domain_error_response, unexpected_error_response
from app.core.errors import DomainError
from app.core.log_context import key_id_var, request_id_var
from app.core.metrics import observe_request
from app.core.middleware import (
    BodyLimit,
    SendWithRequestId,
    caller_request_id,
    declared_length,
    tag_request,
)
from app.gateway.router import answer_directly, submit_job
from app.gateway.schemas import ChatCompletionRequest
from app.operations.router import poll_response
from app.services import Services

log = logging.getLogger(__name__)

PATH = "/v1/chat/completions"
ASYNC_QUERY = b"async=true"
POLL_PREFIX = "/v1/operations/"
# The route templates the fast paths' requests are counted under, as the stack's routes are.
CHAT_ROUTE = PATH
POLL_ROUTE = "/v1/operations/{operation_id}"
# `?wait=N` in plain decimal; anything else (a sign, an exponent, "nan") is FastAPI's to judge.
_PLAIN_WAIT = re.compile(rb"wait=(\d{1,6}(?:\.\d{1,6})?)")
# The route's header limits: longer values go to FastAPI, which answers them with a 400.
_MAX_CACHE_CONTROL = 200
_MAX_IDEMPOTENCY_KEY = 255
_MAX_EXPERIMENT_UNIT = 256


@dataclass(slots=True)
class _Head:
    """What the fast path reads from the request's headers."""

    content_length: int | None = None
    cache_control: str | None = None
    idempotency_key: str | None = None
    request_id: str | None = None
    authorization: str | None = None
    api_key: str | None = None
    unit: str | None = None  # X-Experiment-Unit


def _fast_head(scope: Scope, job: bool) -> _Head | None:
    """The headers the fast path reads, or None when FastAPI must answer the request."""
    json_body = False
    content_length: int | None = None
    cache_control = idempotency_key = request_id = authorization = api_key = unit = None
    for name, value in scope["headers"]:
        if name == b"content-type":
            media = value.split(b";", 1)[0].strip().lower()
            json_body = media == b"application/json"
        elif name == b"content-length":
            content_length = declared_length(value)
            if content_length is None:
                return None
        elif name == b"authorization":
            authorization = value.decode("latin-1")
        elif name == b"x-api-key":
            api_key = value.decode("latin-1")
        elif name == b"x-request-id":
            request_id = caller_request_id(value)
        elif name == b"idempotency-key":
            if not job or len(value) > _MAX_IDEMPOTENCY_KEY:
                return None  # only meaningful for jobs; FastAPI says so
            idempotency_key = value.decode("latin-1")
        elif name == b"cache-control":
            if len(value) > _MAX_CACHE_CONTROL:
                return None
            cache_control = value.decode("latin-1")
        elif name == b"x-experiment-unit":
            if len(value) > _MAX_EXPERIMENT_UNIT:
                return None
            unit = value.decode("latin-1")
    if not json_body:
        return None
    return _Head(
        content_length, cache_control, idempotency_key, request_id, authorization, api_key, unit
    )


def _poll_head(scope: Scope) -> _Head:
    request_id = authorization = api_key = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            authorization = value.decode("latin-1")
        elif name == b"x-api-key":
            api_key = value.decode("latin-1")
        elif name == b"x-request-id":
            request_id = caller_request_id(value)
    return _Head(request_id=request_id, authorization=authorization, api_key=api_key)


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


Produce = Callable[[Services, Principal], Awaitable[Response]]


class FastPaths:
    """Answers the hot routes' plain requests; hands every other one to `stack` (FastAPI's)."""

    def __init__(self, app: FastAPI, stack: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.stack = stack
        self.max_bytes = max_bytes

    async def chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        """`POST /v1/chat/completions`, answered directly or as a job."""
        query = scope.get("query_string")
        job = query == ASYNC_QUERY
        head = _fast_head(scope, job) if job or not query else None
        limit = BodyLimit(self.max_bytes)
        if head is None or limit.refuses_declared(head.content_length):
            await self.stack(scope, receive, send)  # the stack answers an oversized body 413
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                # The client left while sending: the stack sees the same disconnect.
                await self.stack(scope, _replay(chunks, message, receive), send)
                return
            chunk = message.get("body", b"")
            chunks.append(chunk)
            more = message.get("more_body", False)
            if limit.passed_by(chunk):
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

        async def produce(services: Services, principal: Principal) -> Response:
            if job:
                return await submit_job(
                    services.calls,
                    principal,
                    request,
                    head.cache_control,
                    head.idempotency_key,
                    unit=head.unit,
                )
            return await answer_directly(
                services.calls, principal, request, head.cache_control, unit=head.unit
            )

        await self._answer(scope, receive, send, head, produce, CHAT_ROUTE)

    async def poll(self, scope: Scope, receive: Receive, send: Send, operation_id: str) -> None:
        """`GET /v1/operations/{id}`, with at most `?wait=N`."""
        query = scope.get("query_string")
        wait = 0.0
        if query:
            plain = _PLAIN_WAIT.fullmatch(query)
            if plain is None:
                await self.stack(scope, receive, send)
                return
            wait = float(plain.group(1))

        async def produce(services: Services, principal: Principal) -> Response:
            return await poll_response(
                services.operations,
                principal,
                operation_id,
                wait,
                max_wait=services.settings.LONG_POLL_MAX_SECONDS,
            )

        await self._answer(scope, receive, send, _poll_head(scope), produce, POLL_ROUTE)

    async def _answer(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        head: _Head,
        produce: Produce,
        route: str,
    ) -> None:
        """Authenticate, produce the response and send it, as the stack would around a route;
        counted under `route` as `RequestMetrics` counts the stack's requests."""
        started = time.perf_counter()
        status = 500
        method, path = scope["method"], scope["path"]
        request_id, token = tag_request(scope, head.request_id)
        key_token = key_id_var.set(None)  # set by `authenticate`, for the request's log lines
        send_with_id = SendWithRequestId(send, request_id)
        services: Services = self.app.state.services
        with tracing.server_span(method, route, scope["headers"]) as span:
            try:
                try:
                    secret = required_key(head.authorization, head.api_key)
                    response = await produce(services, await services.keys.authenticate(secret))
                except DomainError as exc:
                    response = domain_error_response(exc, method, path)
                status = response.status_code
                if isinstance(response, StreamingResponse):
                    await response(scope, receive, send_with_id)
                    return
                await send_with_id.whole(response)
                if response.background is not None:
                    await response.background()
            except Exception as exc:
                # What the stack's last-resort handler does: logged once, with the request id.
                if send_with_id.started:
                    log.exception(
                        "error on %s %s once answering (request id %s)", method, path, request_id
                    )
                    return
                error = unexpected_error_response(method, path, request_id, exc)
                status = error.status_code
                await _send_plain(error, send)  # its headers carry the request id already
            finally:
                span.set_http_status(status)
                key_id_var.reset(key_token)
                request_id_var.reset(token)
                observe_request(route, method, status, started)


async def _send_plain(response: Response, send: Send) -> None:
    headers = response.raw_headers
    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": response.body})


class GatewayApp(FastAPI):
    """FastAPI, with the hot routes' plain requests answered by `FastPaths` in front of its
    stack."""

    def __init__(self, *, max_request_bytes: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fast_paths = FastPaths(self, super().__call__, max_request_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if path == PATH and scope["method"] == "POST":
                scope["app"] = self
                await self.fast_paths.chat(scope, receive, send)
                return
            if path.startswith(POLL_PREFIX) and scope["method"] == "GET":
                operation_id = path[len(POLL_PREFIX) :]
                if operation_id and "/" not in operation_id:
                    scope["app"] = self
                    await self.fast_paths.poll(scope, receive, send, operation_id)
                    return
        await super().__call__(scope, receive, send)

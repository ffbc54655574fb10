"""`/v1/chat/completions` (direct, streamed, or as a job), `/v1/embeddings`, and `/admin/chains`."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import APIRouter, Header, Query
from fastapi.responses import Response, StreamingResponse
from starlette.background import BackgroundTask

from app.access.deps import AdminDep, PrincipalDep, ServicesDep
from app.access.service import Principal
from app.core.api_errors import error_body
from app.core.error_status import domain_status
from app.core.errors import DomainError, InvalidInput
from app.gateway.cache import CacheControl, tenant_of
from app.gateway.chat import ChatStream
from app.gateway.entities import ModelChain
from app.gateway.schemas import (
    ChainCreate,
    ChainList,
    ChainRead,
    ChainStep,
    ChainUpdate,
    ChatCompletionRequest,
    EmbeddingRequest,
    OperationAccepted,
)
from app.models.entities import ModelKind
from app.operations.entities import OperationKind
from app.operations.service import Owner
from app.services import Services
from app.usage.admission import Admission
from app.usage.entities import UsageType
from app.usage.pricing import estimate_message_tokens
from app.usage.settlement import UsageOutcome

log = logging.getLogger(__name__)

router = APIRouter(tags=["chat"])
admin_router = APIRouter(prefix="/admin/chains", tags=["admin: chains"])

MODEL_HEADER = "x-gateway-model"
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "Invalid request (the error names the field)"},
    404: {"description": "Unknown or disabled model or chain"},
    429: {"description": "Rate limited (here or upstream)"},
    502: {"description": "The upstream failed"},
    504: {"description": "The upstream did not answer in time"},
}


def _json(body: Any, model_id: str, extra: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(body),
        media_type="application/json",
        headers={MODEL_HEADER: model_id, **(extra or {})},
    )


def _sse_error(exc: DomainError) -> bytes:
    _, type_ = domain_status(exc)
    body = error_body(exc.message, type_, param=exc.param, code=exc.code)
    return b"data: " + orjson.dumps(body) + b"\n\n"


async def _sse(stream: ChatStream) -> AsyncIterator[bytes]:
    try:
        async for chunk in stream.chunks:
            yield b"data: " + orjson.dumps(chunk) + b"\n\n"
    except DomainError as exc:
        # Headers are gone already: the error travels as an event, and the SDK raises it.
        yield _sse_error(exc)
        return
    yield b"data: [DONE]\n\n"


async def answer_directly(
    request: ChatCompletionRequest,
    principal: Principal,
    services: Services,
    control: CacheControl,
    *,
    checked: bool = False,
) -> Response:
    """Admit, call, settle: the answer to a chat completion made directly (not as a job).

    `checked`: the caller already verified that the key may use the model and prompts.
    """
    if not checked:
        principal.ensure_can_call(request.model, request.messages)
    # Before admission: a malformed request is a 400, never a 402 or 429 on its max_tokens.
    wire = request.check()
    tenant = tenant_of(principal.team_id, principal.key_id)
    # Rate limits and budgets: admitted against the route's first model, settled below.
    route = await services.chat.resolve(request.model)
    admission = await services.metering.admit(
        principal,
        route.steps[0].upstream.model_id,
        estimate_message_tokens(m.text() for m in request.messages),
        request.max_completion_tokens or request.max_tokens,
    )
    if request.stream:
        try:
            stream = await services.chat.open_stream(
                request, tenant=tenant, cache_control=control, checked=wire
            )
        except BaseException as exc:
            await services.metering.fail(admission, exc)
            raise
        cached = stream.cache.headers() if stream.cache is not None else {}
        metered = services.metering.stream(
            admission,
            _sse(stream),
            lambda: stream.usage,
            model_id=stream.model_id,
            cache_hit=stream.cache is not None and stream.cache.hit,
        )
        return StreamingResponse(
            metered,
            media_type="text/event-stream",
            headers={
                MODEL_HEADER: stream.model_id,
                "cache-control": "no-cache",
                **cached,
                **admission.headers,
            },
        )
    try:
        answer = await services.chat.complete(
            request, tenant=tenant, cache_control=control, checked=wire
        )
    except BaseException as exc:
        await services.metering.fail(admission, exc)
        raise
    outcome = UsageOutcome(
        input_tokens=int(answer.usage.get("prompt_tokens") or 0),
        output_tokens=int(answer.usage.get("completion_tokens") or 0),
        model_id=answer.model_id,
        cache_hit=answer.cache is not None and answer.cache.hit,
        request_body=request,
        response_body=answer.body,
        latency_ms=int((time.monotonic() - admission.started) * 1000),
    )
    cache_headers = answer.cache.headers() if answer.cache else {}
    response = _json(answer.body, answer.model_id, {**cache_headers, **admission.headers})
    # Settled once the answer is on its way: the reservation already holds the call's place in
    # the limits and budgets, settling only corrects it, and the client need not wait on that.
    response.background = BackgroundTask(_settle, services, admission, outcome)
    return response


async def _settle(services: Services, admission: Admission, outcome: UsageOutcome) -> None:
    try:
        await services.metering.settle(admission, outcome)
    except Exception:
        # The reservation stands (it expires with its window); the answer was delivered.
        log.exception("settling a chat completion's usage failed")


@router.post(
    "/v1/chat/completions",
    responses={
        202: {"model": OperationAccepted, "description": "Accepted as a job"},
        **_ERRORS,
    },
)
async def chat_completions(
    request: ChatCompletionRequest,
    principal: PrincipalDep,
    services: ServicesDep,
    run_async: bool = Query(default=False, alias="async"),
    idempotency_key: str | None = Header(default=None, max_length=255),
    cache_control: str | None = Header(default=None, max_length=200),
) -> Any:
    """A chat completion, streamed with `stream: true`; with `?async=true`, a job to poll."""
    # Plain direct calls rarely get here: `app.fastpath` answers them through `answer_directly`.
    principal.ensure_can_call(request.model, request.messages)
    control = CacheControl.parse(cache_control)  # a bad max-age is a 400, even for a job
    if not run_async:
        return await answer_directly(request, principal, services, control, checked=True)
    return await submit_job(
        request, principal, services, cache_control, idempotency_key, checked=True
    )


async def submit_job(
    request: ChatCompletionRequest,
    principal: Principal,
    services: Services,
    cache_control: str | None,
    idempotency_key: str | None,
    *,
    checked: bool = False,
) -> Response:
    """Accept a chat completion as a job: 202 with the operation to poll, once it is committed.

    `checked`: the caller already verified that the key may use the model and prompts, and
    parsed `cache_control`.
    """
    if not checked:
        principal.ensure_can_call(request.model, request.messages)
        CacheControl.parse(cache_control)  # a bad max-age is a 400, even for a job
    if request.stream:
        raise InvalidInput("an async request cannot be streamed", param="stream")
    wire = request.check()
    await services.chat.resolve(request.model)  # an unknown model is refused now, not later
    operation, created = await services.operations.submit(
        kind=OperationKind.CHAT_COMPLETION,
        input=wire,
        owner=Owner(key_id=principal.key_id, team_id=principal.team_id),
        idempotency_key=idempotency_key,
        # The worker applies the same cache policy as a direct call would.
        meta={"cache_control": cache_control} if cache_control else None,
    )
    # The shape of `OperationAccepted`, built directly: this is the route jobs are submitted on.
    body = {"operation_id": operation.id, "status": operation.status.value}
    headers = {"Location": f"/v1/operations/{operation.id}"}
    if not created:
        headers["Idempotent-Replayed"] = "true"
    return Response(orjson.dumps(body), 202, headers, media_type="application/json")


@router.post("/v1/embeddings", tags=["embeddings"], responses=_ERRORS)
async def embeddings(
    request: EmbeddingRequest, principal: PrincipalDep, services: ServicesDep
) -> Any:
    """Embedding vectors for a string or a list of strings, from a model of kind `embedding`."""
    principal.ensure_can_call(request.model)
    request.check()
    route = await services.chat.resolve(request.model, kind=ModelKind.EMBEDDING)
    async with services.metering.metered(
        principal,
        route.steps[0].upstream.model_id,
        estimate_message_tokens(request.inputs()),
        0,
        usage_type=UsageType.EMBEDDING,
    ) as call:
        model_id, body = await services.chat.embed(request)
        call.done_with_usage(body.get("usage"), model_id=model_id)
    return _json(body, model_id, call.headers)


def _chain_read(chain: ModelChain) -> ChainRead:
    return ChainRead(
        id=chain.id,
        name=chain.name,
        description=chain.description,
        steps=[ChainStep.model_validate(s) for s in chain.steps],
        enabled=chain.enabled,
        created_at=int(chain.created_at.timestamp()),
        updated_at=int(chain.updated_at.timestamp()),
    )


@admin_router.get("", response_model=ChainList)
async def list_chains(admin: AdminDep, services: ServicesDep) -> ChainList:
    """Every model chain."""
    return ChainList(data=[_chain_read(c) for c in await services.chains.list_chains()])


@admin_router.post("", response_model=ChainRead, status_code=201)
async def create_chain(data: ChainCreate, admin: AdminDep, services: ServicesDep) -> ChainRead:
    """A new chain; clients call it by putting its id in `model`."""
    return _chain_read(await services.chains.create(data))


@admin_router.get("/{chain_id}", response_model=ChainRead)
async def get_chain(chain_id: str, admin: AdminDep, services: ServicesDep) -> ChainRead:
    """One chain."""
    return _chain_read(await services.chains.get(chain_id))


@admin_router.patch("/{chain_id}", response_model=ChainRead)
async def update_chain(
    chain_id: str, data: ChainUpdate, admin: AdminDep, services: ServicesDep
) -> ChainRead:
    """Change a chain's name, steps or enabled flag."""
    return _chain_read(await services.chains.update(chain_id, data))


@admin_router.delete("/{chain_id}", status_code=204)
async def delete_chain(chain_id: str, admin: AdminDep, services: ServicesDep) -> Response:
    """Remove a chain."""
    await services.chains.delete(chain_id)
    return Response(status_code=204)

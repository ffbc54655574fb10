"""`/v1/chat/completions` (direct, streamed, or as a job), `/v1/embeddings`, and `/admin/chains`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Header, Query
from fastapi.responses import Response, StreamingResponse

from app.access.deps import AdminDep, PrincipalDep
from app.access.service import Principal
from app.core.api_errors import error_body
from app.core.error_status import domain_status
from app.core.errors import DomainError
from app.core.provide import provide
from app.core.schemas import from_entity
from app.gateway.cache import CacheControl
from app.gateway.calls import CallContext, GatewayCalls
from app.gateway.chains import ChainService
from app.gateway.schemas import (
    ChainCreate,
    ChainList,
    ChainRead,
    ChainUpdate,
    ChatCompletionRequest,
    EmbeddingRequest,
    OperationAccepted,
)
from app.models.entities import ModelChain

log = logging.getLogger(__name__)

CallsDep = Annotated[GatewayCalls, Depends(provide(GatewayCalls))]
ChainsDep = Annotated[ChainService, Depends(provide(ChainService))]

router = APIRouter(tags=["chat"])
admin_router = APIRouter(prefix="/admin/chains", tags=["admin: chains"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "Invalid request (the error names the field)"},
    404: {"description": "Unknown or disabled model or chain"},
    429: {"description": "Rate limited (here or upstream)"},
    502: {"description": "The upstream failed"},
    504: {"description": "The upstream did not answer in time"},
}


def _json(body: Any, headers: dict[str, str]) -> Response:
    """An answer with the headers `GatewayCalls` gave it (model, provider, cost, overhead...)."""
    return Response(orjson.dumps(body), media_type="application/json", headers=headers)


def _sse_error(exc: DomainError) -> bytes:
    _, type_ = domain_status(exc)
    body = error_body(exc.message, type_, param=exc.param, code=exc.code)
    return b"data: " + orjson.dumps(body) + b"\n\n"


async def _sse(chunks: AsyncIterator[Any]) -> AsyncIterator[bytes]:
    try:
        async for chunk in chunks:
            yield b"data: " + orjson.dumps(chunk) + b"\n\n"
    except DomainError as exc:
        # Headers are gone already: the error travels as an event, and the SDK raises it.
        yield _sse_error(exc)
        return
    yield b"data: [DONE]\n\n"


async def answer_directly(
    calls: GatewayCalls,
    principal: Principal,
    request: ChatCompletionRequest,
    cache_control: str | None,
    *,
    unit: str | None = None,
) -> Response:
    """The answer to a chat completion made directly (not as a job), streamed or not."""
    context = CallContext(cache_control=CacheControl.parse(cache_control), unit=unit)
    if request.stream:
        streamed = await calls.stream(principal, request, context)
        return StreamingResponse(
            _sse(streamed.chunks),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", **streamed.headers},
        )
    completion = await calls.complete(principal, request, context)
    # Settled before the answer is sent: its usage is committed first (with the calls settling
    # meanwhile, one transaction for all), so a crash can lose no call that was answered.
    await completion.settle()
    return _json(completion.body, completion.headers)


async def submit_job(
    calls: GatewayCalls,
    principal: Principal,
    request: ChatCompletionRequest,
    cache_control: str | None,
    idempotency_key: str | None,
    *,
    unit: str | None = None,
) -> Response:
    """Accept a chat completion as a job: 202 with the operation to poll, once it is committed."""
    accepted = await calls.submit(
        principal,
        request,
        cache_control=cache_control,
        idempotency_key=idempotency_key,
        unit=unit,
    )
    operation = accepted.operation
    # The shape of `OperationAccepted`, built directly: this is the route jobs are submitted on.
    body = {"operation_id": operation.id, "status": operation.status.value}
    headers = {"Location": f"/v1/operations/{operation.id}"}
    if not accepted.created:
        headers["Idempotent-Replayed"] = "true"
    return Response(orjson.dumps(body), 202, headers, media_type="application/json")


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
    calls: CallsDep,
    run_async: bool = Query(default=False, alias="async"),
    idempotency_key: str | None = Header(default=None, max_length=255),
    cache_control: str | None = Header(default=None, max_length=200),
    x_experiment_unit: str | None = Header(
        default=None,
        max_length=256,
        description="What a running experiment assigns by, when it assigns by header",
    ),
) -> Any:
    """A chat completion, streamed with `stream: true`; with `?async=true`, a job to poll."""
    # Plain direct calls rarely get here: `app.fastpath` answers them through `answer_directly`.
    unit = x_experiment_unit
    if not run_async:
        return await answer_directly(calls, principal, request, cache_control, unit=unit)
    return await submit_job(calls, principal, request, cache_control, idempotency_key, unit=unit)


@router.post("/v1/embeddings", tags=["embeddings"], responses=_ERRORS)
async def embeddings(request: EmbeddingRequest, principal: PrincipalDep, calls: CallsDep) -> Any:
    """Embedding vectors for a string or a list of strings, from a model of kind `embedding`."""
    embedded = await calls.embed(principal, request)
    return _json(embedded.body, embedded.headers)


def _chain_read(chain: ModelChain) -> ChainRead:
    return from_entity(
        ChainRead,
        chain,
        created_at=int(chain.created_at.timestamp()),
        updated_at=int(chain.updated_at.timestamp()),
    )


@admin_router.get("", response_model=ChainList)
async def list_chains(admin: AdminDep, chains: ChainsDep) -> ChainList:
    """Every model chain."""
    return ChainList(data=[_chain_read(c) for c in await chains.list_chains()])


@admin_router.post("", response_model=ChainRead, status_code=201)
async def create_chain(data: ChainCreate, admin: AdminDep, chains: ChainsDep) -> ChainRead:
    """A new chain; clients call it by putting its id in `model`."""
    return _chain_read(await chains.create(data))


@admin_router.get("/{chain_id}", response_model=ChainRead)
async def get_chain(chain_id: str, admin: AdminDep, chains: ChainsDep) -> ChainRead:
    """One chain."""
    return _chain_read(await chains.get(chain_id))


@admin_router.patch("/{chain_id}", response_model=ChainRead)
async def update_chain(
    chain_id: str, data: ChainUpdate, admin: AdminDep, chains: ChainsDep
) -> ChainRead:
    """Change a chain's name, steps or enabled flag."""
    return _chain_read(await chains.update(chain_id, data))


@admin_router.delete("/{chain_id}", status_code=204)
async def delete_chain(chain_id: str, admin: AdminDep, chains: ChainsDep) -> Response:
    """Remove a chain."""
    await chains.delete(chain_id)
    return Response(status_code=204)

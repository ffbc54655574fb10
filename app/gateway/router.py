"""`POST /v1/chat/completions`: answered directly, or accepted as a job with `?async=true`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Header, Query
from fastapi.responses import JSONResponse

from app.access.deps import PrincipalDep, ServicesDep
from app.core.errors import InvalidInput
from app.gateway.schemas import ChatCompletionRequest, OperationAccepted
from app.operations.entities import OperationKind
from app.operations.service import Owner

router = APIRouter(tags=["chat"])


@router.post(
    "/v1/chat/completions",
    responses={202: {"model": OperationAccepted, "description": "Accepted as a job"}},
)
async def chat_completions(
    request: ChatCompletionRequest,
    principal: PrincipalDep,
    services: ServicesDep,
    run_async: bool = Query(default=False, alias="async"),
    idempotency_key: str | None = Header(default=None, max_length=255),
) -> Any:
    """A chat completion; with `?async=true`, a job to poll at `/v1/operations/{id}`."""
    if not run_async:
        if request.stream:
            raise InvalidInput("streaming is not available on this endpoint yet", param="stream")
        return await services.chat.complete(request)
    if request.stream:
        raise InvalidInput("an async request cannot be streamed", param="stream")
    await services.chat.resolve_model(request.model)  # an unknown model is refused now, not later
    operation, created = await services.operations.submit(
        kind=OperationKind.CHAT_COMPLETION,
        input=request.model_dump(exclude_none=True),
        owner=Owner(key_id=principal.key_id, team_id=principal.team_id),
        idempotency_key=idempotency_key,
    )
    body = OperationAccepted(operation_id=operation.id, status=operation.status.value)
    headers = {"Location": f"/v1/operations/{operation.id}"}
    if not created:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(body.model_dump(), status_code=202, headers=headers)

"""Operator endpoints: `/health`, `/live`, `/ready`."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from app import __version__
from app.system.checks import check_readiness
from app.system.schemas import HealthRead, LiveRead, ReadyRead

router = APIRouter(tags=["system"])


@router.get("/health")
async def health() -> HealthRead:
    """The service is up; reports its version."""
    return HealthRead(version=__version__)


@router.get("/live")
async def live() -> LiveRead:
    """The process answers (it does not look at dependencies)."""
    return LiveRead()


@router.get(
    "/ready",
    response_model_exclude_none=True,
    responses={503: {"model": ReadyRead, "description": "A dependency is unavailable"}},
)
async def ready(request: Request, response: Response) -> ReadyRead:
    """The process can serve requests: its database and its Redis, when it uses one, answer."""
    # The dependencies the lifespan built the process's services on (`process_dependencies`).
    readiness = await check_readiness(request.app.state.dependencies)
    if readiness.status != "ready":
        response.status_code = 503
    return readiness

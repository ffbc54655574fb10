"""Operator endpoints: `/health`, `/live`, `/ready`."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from app import __version__
from app.core.deps import SettingsDep, StorageDep
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
async def ready(
    request: Request, response: Response, settings: SettingsDep, storage: StorageDep
) -> ReadyRead:
    """The process can serve requests: its database (and Redis, when used) answer."""
    redis_client = getattr(request.app.state, "redis", None)
    readiness = await check_readiness(settings, storage, redis_client)
    if readiness.status != "ready":
        response.status_code = 503
    return readiness

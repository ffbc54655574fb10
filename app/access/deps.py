"""Authentication dependencies: every /v1 route needs a key, every /admin route an admin key."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.access.service import Principal
from app.core.errors import PermissionDenied, Unauthenticated
from app.services import Services


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def _presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    key = request.headers.get("x-api-key")
    return key.strip() if key else None


async def get_principal(request: Request, services: ServicesDep) -> Principal:
    secret = _presented_key(request)
    if secret is None:
        raise Unauthenticated(
            "API key required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
        )
    principal = await services.keys.authenticate(secret)
    request.state.principal = principal
    return principal


async def require_admin(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
    if not principal.admin:
        raise PermissionDenied("this route requires an API key with admin rights")
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]
AdminDep = Annotated[Principal, Depends(require_admin)]

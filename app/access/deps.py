"""Authentication dependencies: every /v1 route needs a key, every /admin route an admin key
or an administrator's session token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from app.access.entities import User
from app.access.service import ApiKeyService, Principal
from app.access.tokens import TokenClaims, looks_like_token
from app.access.users import UserService
from app.core.errors import PermissionDenied, Unauthenticated
from app.core.provide import provide

# What authentication reads; the access routes use the same two.
KeysDep = Annotated[ApiKeyService, Depends(provide(ApiKeyService))]
UsersDep = Annotated[UserService, Depends(provide(UserService))]


def presented_key(authorization: str | None, api_key: str | None) -> str | None:
    """The key or token a request presents: `Authorization: Bearer …`, else `X-API-Key`."""
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return api_key.strip() if api_key else None


MISSING_KEY = "API key required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"


def required_key(authorization: str | None, api_key: str | None) -> str:
    """The key a /v1 request presents (`presented_key`); a 401 when it presents none (the route
    dependency and the fast path both refuse this way)."""
    secret = presented_key(authorization, api_key)
    if secret is None:
        raise Unauthenticated(MISSING_KEY)
    return secret


def _presented_key(request: Request) -> str | None:
    return presented_key(request.headers.get("authorization"), request.headers.get("x-api-key"))


async def get_principal(request: Request, keys: KeysDep) -> Principal:
    headers = request.headers
    secret = required_key(headers.get("authorization"), headers.get("x-api-key"))
    principal = await keys.authenticate(secret)
    request.state.principal = principal
    return principal


async def require_admin(request: Request, keys: KeysDep, users: UsersDep) -> Principal:
    credential = _presented_key(request)
    if credential is None:
        raise Unauthenticated(
            "an admin API key or an administrator's session token is required: send "
            "'Authorization: Bearer <key or token>'"
        )
    if looks_like_token(credential):
        principal = await users.admin_principal(credential)
    else:
        principal = await keys.authenticate(credential)
        if not principal.admin:
            raise PermissionDenied("this route requires an API key with admin rights")
    request.state.principal = principal
    return principal


@dataclass(frozen=True, slots=True)
class Session:
    """A signed-in user and the token they presented."""

    user: User
    claims: TokenClaims


async def get_session(request: Request, users: UsersDep) -> Session:
    token = _presented_key(request)
    if token is None or not looks_like_token(token):
        raise Unauthenticated(
            "a session token is required: sign in at /auth/login and send "
            "'Authorization: Bearer <access_token>'"
        )
    user, claims = await users.session(token)
    return Session(user, claims)


PrincipalDep = Annotated[Principal, Depends(get_principal)]
AdminDep = Annotated[Principal, Depends(require_admin)]
SessionDep = Annotated[Session, Depends(get_session)]

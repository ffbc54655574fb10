"""Sign-in (`/auth`) and the admin API for users, teams and API keys (`/admin`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response

from app.access.deps import AdminDep, KeysDep, SessionDep, UsersDep
from app.access.entities import ApiKeyStatus, TeamStatus
from app.access.schemas import (
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyList,
    ApiKeyRead,
    ApiKeyUpdate,
    LimitName,
    LoginRequest,
    MemberCreate,
    MemberList,
    MemberRead,
    MemberUpdate,
    TeamCreate,
    TeamList,
    TeamRead,
    TeamUpdate,
    TokenRead,
    UserCreate,
    UserList,
    UserRead,
    UserUpdate,
)
from app.access.teams import TeamService
from app.core.clock import utcnow
from app.core.provide import provide
from app.core.schemas import PageAfter, PageLimit

auth_router = APIRouter(prefix="/auth", tags=["auth"])
admin_router = APIRouter(prefix="/admin", tags=["admin: access"])

TeamsDep = Annotated[TeamService, Depends(provide(TeamService))]


def limits(values: Mapping[LimitName, int]) -> dict[str, int]:
    return {str(name): value for name, value in values.items()}


# -- sign-in ---------------------------------------------------------------------------------


@auth_router.post("/login", response_model=TokenRead)
async def login(request: Request, body: LoginRequest, users: UsersDep) -> TokenRead:
    """Exchange a username and password for a session token (429 after repeated failures)."""
    token, claims, _ = await users.login(
        username=body.username,
        password=body.password,
        address=request.client.host if request.client else None,
    )
    expires_in = int((claims.expires_at - utcnow()).total_seconds())
    return TokenRead(access_token=token, expires_in=expires_in, expires_at=claims.expires_at)


@auth_router.get("/me", response_model=UserRead)
async def me(session: SessionDep) -> UserRead:
    """The signed-in user."""
    return UserRead.of(session.user)


@auth_router.post("/logout", status_code=204)
async def logout(session: SessionDep, users: UsersDep) -> Response:
    """Revoke the session token presented with this request."""
    await users.logout(session.claims)
    return Response(status_code=204)


# -- users -----------------------------------------------------------------------------------


@admin_router.post("/users", response_model=UserRead, status_code=201)
async def create_user(body: UserCreate, admin: AdminDep, users: UsersDep) -> UserRead:
    """Create a user who can sign in."""
    user = await users.create_user(
        username=body.username, password=body.password, is_admin=body.is_admin
    )
    return UserRead.of(user)


@admin_router.get("/users", response_model=UserList)
async def list_users(
    admin: AdminDep,
    users: UsersDep,
    limit: PageLimit = 20,
    after: PageAfter = None,
) -> UserList:
    """Users by username."""
    return UserList.of(await users.list_users(limit=limit, after=after), UserRead.of)


@admin_router.get("/users/{user_id}", response_model=UserRead)
async def get_user(user_id: str, admin: AdminDep, users: UsersDep) -> UserRead:
    """One user."""
    return UserRead.of(await users.get_user(user_id))


@admin_router.patch("/users/{user_id}", response_model=UserRead)
async def update_user(user_id: str, body: UserUpdate, admin: AdminDep, users: UsersDep) -> UserRead:
    """Change a user's password, admin rights or status."""
    changes = body.model_dump(exclude_unset=True)
    return UserRead.of(await users.update_user(user_id, changes))


@admin_router.delete("/users/{user_id}", status_code=204)
async def delete_user(user_id: str, admin: AdminDep, users: UsersDep) -> Response:
    """Delete a user and their team memberships."""
    await users.delete_user(user_id)
    return Response(status_code=204)


# -- teams -----------------------------------------------------------------------------------


@admin_router.post("/teams", response_model=TeamRead, status_code=201)
async def create_team(body: TeamCreate, admin: AdminDep, teams: TeamsDep) -> TeamRead:
    """Create a team."""
    team = await teams.create_team(
        name=body.name, description=body.description, rate_limits=limits(body.rate_limits)
    )
    return TeamRead.of(team)


@admin_router.get("/teams", response_model=TeamList)
async def list_teams(
    admin: AdminDep,
    teams: TeamsDep,
    status: TeamStatus | None = None,
    limit: PageLimit = 20,
    after: PageAfter = None,
) -> TeamList:
    """Teams newest first."""
    page = await teams.list_teams(status=status, limit=limit, after=after)
    return TeamList.of(page, TeamRead.of)


@admin_router.get("/teams/{team_id}", response_model=TeamRead)
async def get_team(team_id: str, admin: AdminDep, teams: TeamsDep) -> TeamRead:
    """One team."""
    return TeamRead.of(await teams.get_team(team_id))


@admin_router.patch("/teams/{team_id}", response_model=TeamRead)
async def update_team(team_id: str, body: TeamUpdate, admin: AdminDep, teams: TeamsDep) -> TeamRead:
    """Change a team's name, description or rate limits."""
    changes = body.model_dump(exclude_unset=True)
    for required in ("name", "rate_limits"):
        if required in changes and changes[required] is None:
            del changes[required]
    return TeamRead.of(await teams.update_team(team_id, changes))


@admin_router.post("/teams/{team_id}/suspend", response_model=TeamRead)
async def suspend_team(team_id: str, admin: AdminDep, teams: TeamsDep) -> TeamRead:
    """Suspend a team: its API keys stop working (not the built-in administrators team)."""
    return TeamRead.of(await teams.suspend_team(team_id))


@admin_router.post("/teams/{team_id}/activate", response_model=TeamRead)
async def activate_team(team_id: str, admin: AdminDep, teams: TeamsDep) -> TeamRead:
    """Make a suspended team active again."""
    return TeamRead.of(await teams.activate_team(team_id))


@admin_router.delete("/teams/{team_id}", status_code=204)
async def delete_team(team_id: str, admin: AdminDep, teams: TeamsDep) -> Response:
    """Delete a team that owns no API keys (not the built-in administrators team)."""
    await teams.delete_team(team_id)
    return Response(status_code=204)


@admin_router.get("/teams/{team_id}/members", response_model=MemberList)
async def list_members(team_id: str, admin: AdminDep, teams: TeamsDep) -> MemberList:
    """A team's members and their roles."""
    members = await teams.list_members(team_id)
    return MemberList(data=[MemberRead.of(m) for m in members])


@admin_router.post("/teams/{team_id}/members", response_model=MemberRead, status_code=201)
async def add_member(
    team_id: str, body: MemberCreate, admin: AdminDep, teams: TeamsDep
) -> MemberRead:
    """Add a user to a team with a role (owner, admin or member)."""
    member = await teams.add_member(team_id, user_id=body.user_id, role=body.role)
    return MemberRead.of(member)


@admin_router.patch("/teams/{team_id}/members/{user_id}", response_model=MemberRead)
async def update_member(
    team_id: str, user_id: str, body: MemberUpdate, admin: AdminDep, teams: TeamsDep
) -> MemberRead:
    """Change a member's role; a team keeps at least one owner."""
    return MemberRead.of(await teams.set_role(team_id, user_id, body.role))


@admin_router.delete("/teams/{team_id}/members/{user_id}", status_code=204)
async def remove_member(team_id: str, user_id: str, admin: AdminDep, teams: TeamsDep) -> Response:
    """Remove a user from a team; a team keeps at least one owner."""
    await teams.remove_member(team_id, user_id)
    return Response(status_code=204)


# -- API keys --------------------------------------------------------------------------------


@admin_router.post("/keys", response_model=ApiKeyCreated, status_code=201)
async def create_key(body: ApiKeyCreate, admin: AdminDep, keys: KeysDep) -> ApiKeyCreated:
    """Issue an API key; its secret is in this answer only."""
    key, secret = await keys.create_key(
        name=body.name,
        description=body.description,
        team_id=body.team_id,
        permissions=body.permissions,
        rate_limits=limits(body.rate_limits),
        expires_at=body.expires_at,
        created_by=admin.key_id,
    )
    return ApiKeyCreated(**ApiKeyRead.of(key).model_dump(), key=secret)


@admin_router.get("/keys", response_model=ApiKeyList)
async def list_keys(
    admin: AdminDep,
    keys: KeysDep,
    team_id: str | None = None,
    status: ApiKeyStatus | None = None,
    limit: PageLimit = 20,
    after: PageAfter = None,
) -> ApiKeyList:
    """API keys newest first, without their secrets."""
    page = await keys.list_keys(team_id=team_id, status=status, limit=limit, after=after)
    return ApiKeyList.of(page, ApiKeyRead.of)


@admin_router.get("/keys/{key_id}", response_model=ApiKeyRead)
async def get_key(key_id: str, admin: AdminDep, keys: KeysDep) -> ApiKeyRead:
    """One API key, without its secret."""
    return ApiKeyRead.of(await keys.get_key(key_id))


@admin_router.patch("/keys/{key_id}", response_model=ApiKeyRead)
async def update_key(key_id: str, body: ApiKeyUpdate, admin: AdminDep, keys: KeysDep) -> ApiKeyRead:
    """Change a key's name, team, permissions, rate limits or expiry."""
    return ApiKeyRead.of(await keys.update_key(key_id, body.changes()))


@admin_router.post("/keys/{key_id}/suspend", response_model=ApiKeyRead)
async def suspend_key(key_id: str, admin: AdminDep, keys: KeysDep) -> ApiKeyRead:
    """Stop a key from working until it is activated again."""
    return ApiKeyRead.of(await keys.suspend_key(key_id))


@admin_router.post("/keys/{key_id}/activate", response_model=ApiKeyRead)
async def activate_key(key_id: str, admin: AdminDep, keys: KeysDep) -> ApiKeyRead:
    """Let a suspended key work again."""
    return ApiKeyRead.of(await keys.activate_key(key_id))


@admin_router.post("/keys/{key_id}/revoke", response_model=ApiKeyRead)
async def revoke_key(key_id: str, admin: AdminDep, keys: KeysDep) -> ApiKeyRead:
    """Revoke a key for good; every API process refuses it within a second."""
    return ApiKeyRead.of(await keys.revoke_key(key_id, revoked_by=admin.key_id))


@admin_router.delete("/keys/{key_id}", response_model=ApiKeyRead)
async def delete_key(key_id: str, admin: AdminDep, keys: KeysDep) -> ApiKeyRead:
    """Revoke a key (its record stays, for the usage that refers to it)."""
    return ApiKeyRead.of(await keys.revoke_key(key_id, revoked_by=admin.key_id))

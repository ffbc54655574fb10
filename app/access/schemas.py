"""Request and response shapes of sign-in and the users, teams and API keys admin API."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from app.access.entities import (
    ApiKey,
    ApiKeyStatus,
    Team,
    TeamMember,
    TeamRole,
    TeamStatus,
    User,
    UserStatus,
)
from app.access.permissions import KeyPermissions
from app.access.service import effective_status
from app.core.schemas import ListPage, from_entity

Username = Annotated[str, Field(min_length=3, max_length=100, pattern=r"^[A-Za-z0-9._@-]+$")]
Password = Annotated[str, Field(min_length=8, max_length=1024)]
Name = Annotated[str, Field(min_length=1, max_length=100)]
Description = Annotated[str, Field(max_length=2000)]
# The spellings the rate limiter reads (app/usage/limits.py), LiteLLM's short ones included.
LimitName = Literal[
    "requests_per_minute",
    "tokens_per_minute",
    "requests_per_day",
    "tokens_per_day",
    "rpm",
    "tpm",
    "rpd",
    "tpd",
]
RateLimits = dict[LimitName, Annotated[int, Field(ge=0)]]


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- sign-in ---------------------------------------------------------------------------------


class LoginRequest(_Input):
    username: str = Field(min_length=1, max_length=100)
    password: str = Field(min_length=1, max_length=1024)


class TokenRead(BaseModel):
    """A session token: send it as `Authorization: Bearer <access_token>`."""

    access_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int
    expires_at: datetime


# -- users -----------------------------------------------------------------------------------


class UserCreate(_Input):
    username: Username
    password: Password
    is_admin: bool = False


class UserUpdate(_Input):
    password: Password | None = None
    is_admin: bool | None = None
    status: UserStatus | None = None


class UserRead(BaseModel):
    id: str
    object: Literal["user"] = "user"
    username: str
    status: UserStatus
    is_admin: bool
    last_login_at: datetime | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, user: User) -> UserRead:
        return from_entity(cls, user)


class UserList(ListPage[UserRead]):
    pass


# -- teams -----------------------------------------------------------------------------------


class TeamCreate(_Input):
    name: Name
    description: Description | None = None
    # Shared by all the team's keys, on top of each key's own limits.
    rate_limits: RateLimits = {}


class TeamUpdate(_Input):
    name: Name | None = None
    description: Description | None = None
    rate_limits: RateLimits | None = None


class TeamRead(BaseModel):
    id: str
    object: Literal["team"] = "team"
    name: str
    description: str | None
    status: TeamStatus
    builtin: bool
    rate_limits: dict[str, Any]
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, team: Team) -> TeamRead:
        return from_entity(cls, team)


class TeamList(ListPage[TeamRead]):
    pass


class MemberCreate(_Input):
    user_id: str = Field(min_length=1, max_length=64)
    role: TeamRole = TeamRole.MEMBER


class MemberUpdate(_Input):
    role: TeamRole


class MemberRead(BaseModel):
    object: Literal["team.member"] = "team.member"
    team_id: str
    user_id: str
    role: TeamRole
    created_at: datetime

    @classmethod
    def of(cls, member: TeamMember) -> MemberRead:
        return from_entity(cls, member)


class MemberList(BaseModel):
    object: Literal["list"] = "list"
    data: list[MemberRead]


# -- API keys --------------------------------------------------------------------------------


class ApiKeyCreate(_Input):
    name: Annotated[str, Field(min_length=1, max_length=200)]
    description: Description | None = None
    team_id: str | None = Field(default=None, max_length=64)
    permissions: KeyPermissions = KeyPermissions()
    rate_limits: RateLimits = {}
    expires_at: AwareDatetime | None = None


class ApiKeyUpdate(_Input):
    name: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    description: Description | None = None
    team_id: str | None = Field(default=None, max_length=64)
    permissions: KeyPermissions | None = None
    rate_limits: RateLimits | None = None
    expires_at: AwareDatetime | None = None

    def changes(self) -> dict[str, Any]:
        """The fields the request set; `null` clears description, team and expiry."""
        changes = self.model_dump(exclude_unset=True)
        for required in ("name", "permissions", "rate_limits"):
            if required in changes and changes[required] is None:
                del changes[required]
        return changes


class ApiKeyRead(BaseModel):
    """An API key as administrators see it: never its secret nor the secret's hash."""

    id: str
    object: Literal["api_key"] = "api_key"
    name: str
    description: str | None
    # The first characters of the secret, to recognise a key in a list.
    key_prefix: str
    status: ApiKeyStatus
    team_id: str | None
    permissions: KeyPermissions
    rate_limits: dict[str, Any]
    expires_at: datetime | None
    last_used_at: datetime | None
    created_by: str | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, key: ApiKey) -> ApiKeyRead:
        return from_entity(
            cls,
            key,
            status=effective_status(key),
            permissions=KeyPermissions.from_stored(key.permissions),
        )


class ApiKeyCreated(ApiKeyRead):
    """The new key with its secret, shown this once only."""

    key: str


class ApiKeyList(ListPage[ApiKeyRead]):
    pass

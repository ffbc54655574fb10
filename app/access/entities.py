"""The access tables: users, teams and their members, and the API keys clients call with."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa

from app.storage.entity import (
    Entity,
    choice,
    instant,
    json_object,
    pk,
    reference,
    text,
)


class UserStatus(StrEnum):
    ACTIVE = "active"
    SUSPENDED = "suspended"


class TeamStatus(StrEnum):
    ACTIVE = "active"
    SUSPENDED = "suspended"


class TeamRole(StrEnum):
    OWNER = "owner"
    ADMIN = "admin"
    MEMBER = "member"


class ApiKeyStatus(StrEnum):
    ACTIVE = "active"
    SUSPENDED = "suspended"
    REVOKED = "revoked"
    EXPIRED = "expired"


class User(Entity, table=True):
    """A person who signs in to the admin interface; the password is kept only as a hash."""

    __tablename__ = "users"

    id: str = pk()
    username: str = text(max_length=100, unique=True)
    password_hash: str = text(max_length=255)
    status: UserStatus = choice(UserStatus, UserStatus.ACTIVE)
    is_admin: bool = False
    last_login_at: datetime | None = instant()


class Team(Entity, table=True):
    """A group of users and API keys that owns usage and budgets together."""

    __tablename__ = "teams"

    id: str = pk()
    name: str = text(max_length=100)
    description: str | None = text(None)
    status: TeamStatus = choice(TeamStatus, TeamStatus.ACTIVE)
    # Teams the gateway creates itself (the administrators team) cannot be deleted.
    builtin: bool = False
    # Limits shared by all the team's keys, in the keys' format (read by app/usage/limits.py).
    rate_limits: dict[str, Any] = json_object()


class TeamMember(Entity, table=True):
    """A user's membership of a team, with the role they hold in it."""

    __tablename__ = "team_members"
    __table_args__ = (
        sa.UniqueConstraint("team_id", "user_id", name="uq_team_members_team_id_user_id"),
    )

    id: str = pk()
    # The unique key leads with team_id, so it serves lookups by team as well.
    team_id: str = reference("teams.id", index=False)
    user_id: str = reference("users.id")
    role: TeamRole = choice(TeamRole, TeamRole.MEMBER)


class ApiKey(Entity, table=True):
    """A client credential: looked up by its prefix, verified against a hash of the whole key."""

    __tablename__ = "api_keys"

    id: str = pk()
    name: str = text(max_length=200)
    description: str | None = text(None)
    key_prefix: str = text(max_length=32, unique=True, index=True)
    secret_hash: str = text(max_length=255)
    status: ApiKeyStatus = choice(ApiKeyStatus, ApiKeyStatus.ACTIVE)
    # A team with keys cannot be deleted: its keys' usage and budgets would lose their owner.
    team_id: str | None = reference("teams.id", on_delete="RESTRICT", nullable=True)
    permissions: dict[str, Any] = json_object()
    rate_limits: dict[str, Any] = json_object()
    expires_at: datetime | None = instant()
    last_used_at: datetime | None = instant()
    created_by: str | None = text(None, max_length=64)

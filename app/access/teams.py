"""Teams, their members and roles; the built-in administrators team is always there."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from app.access.entities import ApiKey, Team, TeamMember, TeamRole, TeamStatus, User
from app.access.service import KEYS_TOPIC
from app.core.errors import Conflict, DuplicateKey, NotFound
from app.core.ids import new_id
from app.core.invalidation import METERING_TOPIC, InvalidationBus
from app.storage.protocol import Page, Storage, UnitOfWork, Where, given
from app.storage.reads import get_existing, read_page

ADMIN_TEAM_ID = "team-administrators"


class TeamService:
    """Creating, suspending and deleting teams, and managing who belongs to them."""

    def __init__(self, storage: Storage, bus: InvalidationBus) -> None:
        self._storage = storage
        self._bus = bus

    async def ensure_admin_team(self) -> Team:
        """The built-in administrators team, created on first start."""
        async with self._storage.unit_of_work() as uow:
            team = await uow.repo(Team).get(ADMIN_TEAM_ID)
            if team is not None:
                return team
            team = Team(
                id=ADMIN_TEAM_ID,
                name="Administrators",
                description="Built-in team of the gateway's administrators.",
                builtin=True,
            )
            try:
                team = await uow.repo(Team).add(team)
                await uow.commit()
            except DuplicateKey:
                pass  # another process created it at the same moment
            return team

    async def create_team(
        self,
        *,
        name: str,
        description: str | None = None,
        rate_limits: Mapping[str, int] | None = None,
    ) -> Team:
        async with self._storage.unit_of_work() as uow:
            team = await uow.repo(Team).add(
                Team(
                    id=new_id("team"),
                    name=name,
                    description=description,
                    rate_limits=dict(rate_limits or {}),
                )
            )
            await uow.commit()
        return team

    async def get_team(self, team_id: str) -> Team:
        async with self._storage.unit_of_work() as uow:
            return await _load(uow, team_id)

    async def list_teams(
        self, *, status: TeamStatus | None = None, limit: int = 20, after: str | None = None
    ) -> Page[Team]:
        where = given(Where.eq("status", status))
        return await read_page(
            self._storage, Team, *where, order_by=["-created_at"], limit=limit, after=after
        )

    async def update_team(self, team_id: str, changes: Mapping[str, Any]) -> Team:
        """Change a team's name, description or rate limits (given fields only)."""
        async with self._storage.unit_of_work() as uow:
            team = await _load(uow, team_id)
            for name in ("name", "description", "rate_limits"):
                if name in changes:
                    setattr(team, name, changes[name])
            team = await uow.repo(Team).update(team)
            await uow.commit()
        if "rate_limits" in changes:
            await self._bus.publish(METERING_TOPIC, f"team:{team_id}")
        return team

    async def suspend_team(self, team_id: str) -> Team:
        """Suspend a team: its API keys stop working in every process."""
        return await self._set_status(team_id, TeamStatus.SUSPENDED)

    async def activate_team(self, team_id: str) -> Team:
        return await self._set_status(team_id, TeamStatus.ACTIVE)

    async def _set_status(self, team_id: str, status: TeamStatus) -> Team:
        async with self._storage.unit_of_work() as uow:
            team = await _load(uow, team_id)
            if team.status is status:
                return team
            if team.builtin and status is TeamStatus.SUSPENDED:
                raise Conflict(f"the built-in team '{team.name}' cannot be suspended")
            team.status = status
            team = await uow.repo(Team).update(team)
            await uow.commit()
        # Cached keys carry their team's status.
        await self._bus.publish(KEYS_TOPIC)
        return team

    async def delete_team(self, team_id: str) -> None:
        """Delete a team without API keys (their usage would lose its owner: suspend it instead)."""
        async with self._storage.unit_of_work() as uow:
            team = await _load(uow, team_id)
            if team.builtin:
                raise Conflict(f"the built-in team '{team.name}' cannot be deleted")
            if await uow.repo(ApiKey).count(Where.eq("team_id", team_id)) > 0:
                raise Conflict(
                    f"team '{team_id}' owns API keys, so it cannot be deleted; suspend it instead"
                )
            await uow.repo(Team).delete(team_id)
            await uow.commit()
        await self._bus.publish(METERING_TOPIC, f"team:{team_id}")

    # -- members ----------------------------------------------------------------------------

    async def list_members(self, team_id: str) -> list[TeamMember]:
        async with self._storage.unit_of_work() as uow:
            await _load(uow, team_id)
            page = await uow.repo(TeamMember).find(
                Where.eq("team_id", team_id), order_by=["created_at"]
            )
        return page.items

    async def add_member(
        self, team_id: str, *, user_id: str, role: TeamRole = TeamRole.MEMBER
    ) -> TeamMember:
        async with self._storage.unit_of_work() as uow:
            await _load(uow, team_id)
            await get_existing(uow.repo(User), user_id, "user", param="user_id")
            if await _membership(uow, team_id, user_id) is not None:
                raise DuplicateKey(
                    f"user '{user_id}' is already a member of team '{team_id}'", param="user_id"
                )
            member = await uow.repo(TeamMember).add(
                TeamMember(id=new_id("member"), team_id=team_id, user_id=user_id, role=role)
            )
            await uow.commit()
        return member

    async def set_role(self, team_id: str, user_id: str, role: TeamRole) -> TeamMember:
        async with self._storage.unit_of_work() as uow:
            member = await _member(uow, team_id, user_id)
            if member.role is TeamRole.OWNER and role is not TeamRole.OWNER:
                await _keep_an_owner(uow, team_id, user_id)
            member.role = role
            member = await uow.repo(TeamMember).update(member)
            await uow.commit()
        return member

    async def remove_member(self, team_id: str, user_id: str) -> None:
        async with self._storage.unit_of_work() as uow:
            member = await _member(uow, team_id, user_id)
            if member.role is TeamRole.OWNER:
                await _keep_an_owner(uow, team_id, user_id)
            await uow.repo(TeamMember).delete(member.id)
            await uow.commit()


async def _load(uow: UnitOfWork, team_id: str) -> Team:
    return await get_existing(uow.repo(Team), team_id, "team", param="id")


async def _membership(uow: UnitOfWork, team_id: str, user_id: str) -> TeamMember | None:
    page = await uow.repo(TeamMember).find(
        Where.eq("team_id", team_id), Where.eq("user_id", user_id), limit=1
    )
    return page.items[0] if page.items else None


async def _member(uow: UnitOfWork, team_id: str, user_id: str) -> TeamMember:
    await _load(uow, team_id)
    member = await _membership(uow, team_id, user_id)
    if member is None:
        raise NotFound("team member", user_id, param="user_id")
    return member


async def _keep_an_owner(uow: UnitOfWork, team_id: str, leaving: str) -> None:
    owners = await uow.repo(TeamMember).count(
        Where.eq("team_id", team_id), Where.eq("role", TeamRole.OWNER), Where.ne("user_id", leaving)
    )
    if owners == 0:
        raise Conflict(f"team '{team_id}' must keep at least one owner", param="role")

"""What access needs in every install: the administrators team and the first administrator."""

from __future__ import annotations

import sys

from pydantic import SecretStr

from app.access.entities import TeamRole
from app.access.teams import ADMIN_TEAM_ID, TeamService
from app.access.users import UserService


async def bootstrap_access(
    teams: TeamService, users: UserService, *, username: str, password: SecretStr | None
) -> None:
    """Create the administrators team and, on first start, the administrator `username` (with
    `password`, or a generated one printed once)."""
    await teams.ensure_admin_team()
    created = await users.bootstrap_admin(
        username=username,
        password=password.get_secret_value() if password is not None else None,
    )
    if created is None:
        return
    user, generated = created
    await teams.add_member(ADMIN_TEAM_ID, user_id=user.id, role=TeamRole.OWNER)
    if generated is not None:
        # Shown once, on the console of the process that created the account; never logged.
        print(
            f"gateway: created the administrator '{user.username}' with password {generated} "
            "(set ADMIN_DEFAULT_PASSWORD to choose it; change it after signing in)",
            file=sys.stdout,
            flush=True,
        )

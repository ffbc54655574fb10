"""What access needs in every install and every API process: the administrators team, the
first administrator, and the invalidation listener that keeps cached keys honest."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from app.access.entities import TeamRole
from app.access.teams import ADMIN_TEAM_ID

if TYPE_CHECKING:
    from app.services import Services


async def bootstrap_access(services: Services) -> None:
    """Create the administrators team and, on first start, the administrator user."""
    await services.teams.ensure_admin_team()
    settings = services.settings
    password = settings.ADMIN_DEFAULT_PASSWORD
    created = await services.users.bootstrap_admin(
        username=settings.ADMIN_USERNAME,
        password=password.get_secret_value() if password is not None else None,
    )
    if created is None:
        return
    user, generated = created
    await services.teams.add_member(ADMIN_TEAM_ID, user_id=user.id, role=TeamRole.OWNER)
    if generated is not None:
        # Shown once, on the console of the process that created the account; never logged.
        print(
            f"gateway: created the administrator '{user.username}' with password {generated} "
            "(set ADMIN_DEFAULT_PASSWORD to choose it; change it after signing in)",
            file=sys.stdout,
            flush=True,
        )


async def start_access(services: Services) -> None:
    """Start following key and configuration changes made by other processes."""
    await services.invalidation.start()


async def stop_access(services: Services) -> None:
    """Stop following changes and write the pending `last_used_at` instants."""
    await services.invalidation.stop()
    await services.keys.close()

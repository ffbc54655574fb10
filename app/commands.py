"""`gateway create-key`: an admin API key for a fresh install, printed once (a composition
root: it builds every service of its short-lived process)."""

from __future__ import annotations

from app.access.teams import ADMIN_TEAM_ID
from app.config import Settings


async def create_admin_key(settings: Settings, *, name: str) -> str:
    """Issue an admin key in the administrators team and return its secret."""
    from app.core.redis import build_redis
    from app.queue.broker import build_broker
    from app.queue.port import DramatiqQueue
    from app.services import build_services
    from app.storage.factory import build_durable_storage

    storage = build_durable_storage(
        settings,
        why="forgets the key when this command exits",
        hint=", or run `gateway dev`, which prints a key",
    )
    redis = build_redis(settings)
    try:
        services = build_services(settings, storage, DramatiqQueue(build_broker(settings)), redis)
        await services.teams.ensure_admin_team()
        _, secret = await services.keys.create_key(
            name=name, admin=True, team_id=ADMIN_TEAM_ID, created_by="gateway create-key"
        )
    finally:
        await redis.aclose()
        await storage.close()
    return secret

"""API keys: issued once, stored as a hash, looked up by prefix, compared in constant time."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from app.access.entities import ApiKey, ApiKeyStatus
from app.core.clock import utcnow
from app.core.errors import Unauthenticated
from app.core.ids import new_id
from app.storage.protocol import Storage, Where

KEY_PREFIX = "gw-"
PREFIX_LENGTH = 12


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller of a request."""

    key_id: str
    team_id: str | None
    admin: bool


def hash_secret(secret: str) -> str:
    # Keys carry 256 random bits, so one SHA-256 resists guessing; a slow hash would only cost
    # latency on every request.
    digest = hashlib.sha256(secret.encode()).digest()
    return "sha256$" + base64.urlsafe_b64encode(digest).decode().rstrip("=")


def new_secret() -> str:
    return KEY_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")


class ApiKeyService:
    """Issuing and checking API keys."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage

    async def create_key(
        self,
        *,
        name: str,
        admin: bool = False,
        team_id: str | None = None,
        secret: str | None = None,
        key_id: str | None = None,
    ) -> tuple[ApiKey, str]:
        """A new key and its secret, which is returned only here and never stored."""
        secret = secret or new_secret()
        key = ApiKey(
            id=key_id or new_id("key"),
            name=name,
            key_prefix=secret[:PREFIX_LENGTH],
            secret_hash=hash_secret(secret),
            team_id=team_id,
            permissions={"admin": admin},
        )
        async with self._storage.unit_of_work() as uow:
            key = await uow.repo(ApiKey).add(key)
            await uow.commit()
        return key, secret

    async def ensure_key(self, *, key_id: str, name: str, secret: str, admin: bool) -> ApiKey:
        """Make sure a key with exactly this secret exists (for ADMIN_API_KEY and dev mode)."""
        async with self._storage.unit_of_work() as uow:
            existing = await uow.repo(ApiKey).get(key_id)
            if existing is not None:
                if existing.secret_hash != hash_secret(secret):
                    existing.key_prefix = secret[:PREFIX_LENGTH]
                    existing.secret_hash = hash_secret(secret)
                    existing = await uow.repo(ApiKey).update(existing)
                    await uow.commit()
                return existing
        key, _ = await self.create_key(name=name, admin=admin, secret=secret, key_id=key_id)
        return key

    async def authenticate(self, secret: str) -> Principal:
        """The principal of an active, unexpired key; `Unauthenticated` otherwise."""
        if len(secret) < PREFIX_LENGTH + 8:
            raise Unauthenticated("Invalid API key")
        async with self._storage.unit_of_work() as uow:
            page = await uow.repo(ApiKey).find(
                Where.eq("key_prefix", secret[:PREFIX_LENGTH]), limit=1
            )
        key = page.items[0] if page.items else None
        if key is None or not hmac.compare_digest(key.secret_hash, hash_secret(secret)):
            raise Unauthenticated("Invalid API key")
        if key.status != ApiKeyStatus.ACTIVE:
            raise Unauthenticated(f"API key is {key.status.value}")
        if key.expires_at is not None and key.expires_at <= utcnow():
            raise Unauthenticated("API key has expired")
        return Principal(
            key_id=key.id, team_id=key.team_id, admin=bool(key.permissions.get("admin"))
        )

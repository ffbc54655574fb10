"""API keys: issued once, stored as a hash, looked up by prefix, compared in constant time.

Lookups are served from an in-process cache that every process drops when a key changes, so
the hot path needs neither the database nor Redis; `last_used_at` is written at most once a
minute per key and process, in the background.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from app.access.entities import ApiKey, ApiKeyStatus, Team, TeamStatus
from app.access.permissions import KeyPermissions, Resource
from app.core.clock import utcnow
from app.core.errors import (
    Conflict,
    DuplicateKey,
    InvalidInput,
    PermissionDenied,
    StaleVersion,
    Unauthenticated,
)
from app.core.events import EventSink, NullSink
from app.core.ids import new_id
from app.core.invalidation import ALL, METERING_TOPIC, InvalidatedCache, InvalidationBus
from app.core.loading import LoadingCache
from app.core.log_context import key_id_var
from app.storage.protocol import Page, Storage, UnitOfWork, Where, given
from app.storage.reads import get_existing, read_existing, read_page

log = logging.getLogger(__name__)

KEY_PREFIX = "gw-"
PREFIX_LENGTH = 12
KEYS_TOPIC = "api_keys"
KEY_CACHE_SECONDS = 30.0
# An unknown prefix is remembered briefly so guessing does not cost a query each time.
UNKNOWN_KEY_CACHE_SECONDS = 5.0
LAST_USED_EVERY_SECONDS = 60.0
_WRITE_ATTEMPTS = 3
_ENSURE_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller of a request.

    `key_id` is the API key's id; for an administrator signed in with a token it is
    `user:<user id>`, and `user_id` is set.
    """

    key_id: str
    team_id: str | None
    admin: bool
    permissions: KeyPermissions = field(default_factory=KeyPermissions)
    # The key's own limits, as the admin API stored them (read by the rate limiter).
    rate_limits: Mapping[str, Any] = field(default_factory=dict)
    user_id: str | None = None

    def can_use(self, resource: Resource | str, resource_id: str) -> bool:
        """Whether this caller may use the resource (for filtering lists)."""
        return self.admin or self.permissions.allows(resource, resource_id)

    def ensure_can_use(
        self, resource: Resource | str, resource_id: str, *, param: str | None = None
    ) -> None:
        """Raise `PermissionDenied` (403, naming the resource) unless the caller may use it."""
        if not self.admin:
            self.permissions.ensure(resource, resource_id, param=param)

    def ensure_can_call(self, model: str, messages: Iterable[Any] = ()) -> None:
        """Check a chat or embedding call: the model (or chain) named in `model`, and every
        stored prompt its messages reference (`prompt_id`, on message objects or dicts)."""
        self.ensure_can_use(Resource.MODELS, model, param="model")
        for index, message in enumerate(messages):
            if isinstance(message, Mapping):
                prompt_id = message.get("prompt_id")
            elif (extra := getattr(message, "model_extra", None)) is not None:
                # A pydantic message keeps `prompt_id` among its extra fields; a getattr that
                # fails costs more than the rest of this check.
                prompt_id = extra.get("prompt_id")
            else:
                prompt_id = getattr(message, "prompt_id", None)
            if prompt_id:
                self.ensure_can_use(
                    Resource.PROMPTS, str(prompt_id), param=f"messages.{index}.prompt_id"
                )


@dataclass(frozen=True, slots=True)
class _CachedKey:
    """What authenticating a key needs, as read from the database (`found` False: no such key)."""

    found: bool
    secret_hash: str = ""
    status: ApiKeyStatus = ApiKeyStatus.ACTIVE
    expires_at: datetime | None = None
    team_active: bool = True
    principal: Principal | None = None


_UNKNOWN = _CachedKey(found=False)


def hash_secret(secret: str) -> str:
    # Keys carry 256 random bits, so one SHA-256 resists guessing; a slow hash would only cost
    # latency on every request.
    digest = hashlib.sha256(secret.encode()).digest()
    return "sha256$" + base64.urlsafe_b64encode(digest).decode().rstrip("=")


def new_secret() -> str:
    return KEY_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")


def effective_status(key: ApiKey) -> ApiKeyStatus:
    """The stored status, or `expired` once an active key's expiry has passed."""
    if (
        key.status is ApiKeyStatus.ACTIVE
        and key.expires_at is not None
        and key.expires_at <= utcnow()
    ):
        return ApiKeyStatus.EXPIRED
    return key.status


def principal_of(key: ApiKey) -> Principal:
    permissions = KeyPermissions.from_stored(key.permissions)
    return Principal(
        key_id=key.id,
        team_id=key.team_id,
        admin=permissions.admin,
        permissions=permissions,
        rate_limits=dict(key.rate_limits),
    )


class ApiKeyService:
    """Issuing, administering and checking API keys."""

    def __init__(
        self,
        storage: Storage,
        *,
        events: EventSink | None = None,
        bus: InvalidationBus | None = None,
        cache_seconds: float = KEY_CACHE_SECONDS,
    ) -> None:
        self._storage = storage
        self._events = events or NullSink()
        self._bus = bus or InvalidationBus(None)
        # Keys by prefix: concurrent requests with a key not (or no longer) cached share one
        # read instead of each opening a connection; an unknown prefix is kept only briefly.
        self._cache: LoadingCache[str, _CachedKey] = LoadingCache(
            lambda prefix: self._read(prefix),
            ttl=lambda entry: self._bus.ttl(
                cache_seconds if entry.found else UNKNOWN_KEY_CACHE_SECONDS
            ),
        )
        self._bus.on(KEYS_TOPIC, self._forget)
        # Keys by id, for jobs checked when they run; invalidations name prefixes, so any
        # change to any key empties it.
        self._by_id: InvalidatedCache[ApiKey | None] = InvalidatedCache(
            self._bus, f"{KEYS_TOPIC}:by-id", ttl=cache_seconds
        )
        self._bus.on(KEYS_TOPIC, lambda _prefix: self._by_id.drop(ALL))
        self._touched: dict[str, float] = {}
        self._pending: dict[str, datetime] = {}
        self._flusher: asyncio.Task[None] | None = None

    # -- issuing ----------------------------------------------------------------------------

    async def create_key(
        self,
        *,
        name: str,
        admin: bool = False,
        team_id: str | None = None,
        secret: str | None = None,
        key_id: str | None = None,
        permissions: KeyPermissions | None = None,
        description: str | None = None,
        rate_limits: Mapping[str, Any] | None = None,
        expires_at: datetime | None = None,
        created_by: str | None = None,
    ) -> tuple[ApiKey, str]:
        """A new key and its secret, which is returned only here and never stored."""
        if expires_at is not None and expires_at <= utcnow():
            raise InvalidInput("expires_at must be in the future", param="expires_at")
        secret = secret or new_secret()
        granted = permissions or KeyPermissions()
        if admin and not granted.admin:
            granted = granted.model_copy(update={"admin": True})
        key = ApiKey(
            id=key_id or new_id("key"),
            name=name,
            description=description,
            key_prefix=secret[:PREFIX_LENGTH],
            secret_hash=hash_secret(secret),
            team_id=team_id,
            permissions=granted.model_dump(),
            rate_limits=dict(rate_limits or {}),
            expires_at=expires_at,
            created_by=created_by,
        )
        async with self._storage.unit_of_work() as uow:
            await self._require_team(uow, team_id)
            key = await uow.repo(ApiKey).add(key)
            await self._events.record(uow, "api_key.created", _event_data(key, created_by))
            await uow.commit()
        # Forget a cached "unknown prefix" everywhere, or the new key would wait for it to expire.
        await self._bus.publish(KEYS_TOPIC, key.key_prefix)
        return key, secret

    async def ensure_key(
        self, *, key_id: str, name: str, secret: str, admin: bool, team_id: str | None = None
    ) -> ApiKey:
        """Make sure a key with exactly this secret exists (for ADMIN_API_KEY and dev mode).

        Safe in processes starting together: of those that find it missing (or holding
        another secret), one writes it and the others find it written.
        """
        for _ in range(_ENSURE_ATTEMPTS):
            try:
                return await self._ensure_key_once(key_id, name, secret, admin, team_id)
            except (DuplicateKey, StaleVersion):
                continue  # another process wrote it meanwhile: look again
        raise Conflict(f"api key '{key_id}' keeps changing; start again")

    async def _ensure_key_once(
        self, key_id: str, name: str, secret: str, admin: bool, team_id: str | None
    ) -> ApiKey:
        async with self._storage.unit_of_work() as uow:
            existing = await uow.repo(ApiKey).get(key_id)
            if existing is not None:
                if existing.secret_hash != hash_secret(secret):
                    old_prefix = existing.key_prefix
                    existing.key_prefix = secret[:PREFIX_LENGTH]
                    existing.secret_hash = hash_secret(secret)
                    existing = await uow.repo(ApiKey).update(existing)
                    await uow.commit()
                    await self._bus.publish(KEYS_TOPIC, old_prefix)
                    await self._bus.publish(KEYS_TOPIC, existing.key_prefix)
                return existing
        key, _ = await self.create_key(
            name=name, admin=admin, secret=secret, key_id=key_id, team_id=team_id
        )
        return key

    # -- administering ----------------------------------------------------------------------

    async def get_key(self, key_id: str) -> ApiKey:
        return await read_existing(self._storage, ApiKey, key_id, "api key", param="id")

    async def list_keys(
        self,
        *,
        team_id: str | None = None,
        status: ApiKeyStatus | None = None,
        limit: int = 20,
        after: str | None = None,
    ) -> Page[ApiKey]:
        """Keys newest first, optionally of one team or in one stored status."""
        where = given(Where.eq("team_id", team_id), Where.eq("status", status))
        return await read_page(
            self._storage, ApiKey, *where, order_by=["-created_at"], limit=limit, after=after
        )

    async def update_key(self, key_id: str, changes: Mapping[str, Any]) -> ApiKey:
        """Change name, description, team, permissions, rate limits or expiry (the given ones)."""
        allowed = {"name", "description", "team_id", "permissions", "rate_limits", "expires_at"}
        unknown = set(changes) - allowed
        if unknown:
            raise InvalidInput(
                f"'{sorted(unknown)[0]}' cannot be changed", param=sorted(unknown)[0]
            )

        async def apply(uow: UnitOfWork, key: ApiKey) -> ApiKey | None:
            if key.status is ApiKeyStatus.REVOKED:
                raise Conflict(f"api key '{key_id}' is revoked and can no longer be changed")
            for name, value in changes.items():
                if name == "permissions":
                    value = KeyPermissions.model_validate(value).model_dump()
                if name == "team_id":
                    await self._require_team(uow, value)
                setattr(key, name, value)
            return await uow.repo(ApiKey).update(key)

        key = await self._change(key_id, apply)
        if "rate_limits" in changes:
            # Calls carry the key's limits (dropped above); jobs' admissions read them by id.
            await self._bus.publish(METERING_TOPIC, f"key:{key_id}")
        return key

    async def suspend_key(self, key_id: str) -> ApiKey:
        return await self._set_status(key_id, ApiKeyStatus.SUSPENDED)

    async def activate_key(self, key_id: str) -> ApiKey:
        return await self._set_status(key_id, ApiKeyStatus.ACTIVE)

    async def revoke_key(self, key_id: str, *, revoked_by: str | None = None) -> ApiKey:
        """Revoke for good: every process refuses the key within a second."""
        return await self._set_status(key_id, ApiKeyStatus.REVOKED, actor=revoked_by)

    async def _set_status(
        self, key_id: str, status: ApiKeyStatus, *, actor: str | None = None
    ) -> ApiKey:

        async def apply(uow: UnitOfWork, key: ApiKey) -> ApiKey | None:
            if key.status is status:
                return None
            if key.status is ApiKeyStatus.REVOKED:
                raise Conflict(f"api key '{key_id}' is revoked and cannot become {status.value}")
            key.status = status
            key = await uow.repo(ApiKey).update(key)
            if status is ApiKeyStatus.REVOKED:
                await self._events.record(uow, "api_key.revoked", _event_data(key, actor))
            return key

        return await self._change(key_id, apply)

    async def _change(
        self, key_id: str, apply: Callable[[UnitOfWork, ApiKey], Awaitable[ApiKey | None]]
    ) -> ApiKey:
        """Read, `apply` (None: nothing to write), commit and tell every process.

        The background `last_used_at` writer may bump the version between read and write, so a
        stale version is retried on a fresh read rather than answered with a conflict.
        """
        attempts = 0
        while True:
            attempts += 1
            try:
                async with self._storage.unit_of_work() as uow:
                    key = await self._load(uow, key_id)
                    changed = await apply(uow, key)
                    if changed is None:
                        return key
                    await uow.commit()
            except StaleVersion:
                if attempts >= _WRITE_ATTEMPTS:
                    raise
                continue
            await self._bus.publish(KEYS_TOPIC, changed.key_prefix)
            return changed

    async def _load(self, uow: UnitOfWork, key_id: str) -> ApiKey:
        return await get_existing(uow.repo(ApiKey), key_id, "api key", param="id")

    @staticmethod
    async def _require_team(uow: UnitOfWork, team_id: str | None) -> None:
        if team_id is not None:
            await get_existing(uow.repo(Team), team_id, "team", param="team_id")

    # -- checking ---------------------------------------------------------------------------

    async def job_principal(self, key_id: str) -> Principal:
        """The principal of the key that submitted a job, as the key is now (a job may run long
        after its submit): a key revoked, suspended or expired since is `PermissionDenied`."""
        key = self._by_id.get(key_id)
        if key is None:
            generation = self._by_id.generation
            async with self._storage.unit_of_work() as uow:
                key = await uow.repo(ApiKey).get(key_id)
            self._by_id.fill(key_id, key, generation)
        if key is None or effective_status(key) is not ApiKeyStatus.ACTIVE:
            state = effective_status(key).value if key is not None else "deleted"
            raise PermissionDenied(f"the API key that submitted this request is {state}")
        return principal_of(key)

    async def authenticate(self, secret: str) -> Principal:
        """The principal of an active, unexpired key; `Unauthenticated` otherwise."""
        if len(secret) < PREFIX_LENGTH + 8:
            raise Unauthenticated("Invalid API key")
        prefix = secret[:PREFIX_LENGTH]
        entry = self._cache.get(prefix)
        if entry is None:
            entry = await self._cache.load(prefix)
        if not entry.found or not hmac.compare_digest(entry.secret_hash, hash_secret(secret)):
            raise Unauthenticated("Invalid API key")
        if entry.status is not ApiKeyStatus.ACTIVE:
            raise Unauthenticated(f"API key is {entry.status.value}")
        if entry.expires_at is not None and entry.expires_at <= utcnow():
            raise Unauthenticated("API key has expired")
        if not entry.team_active:
            raise Unauthenticated("the API key's team is suspended")
        assert entry.principal is not None
        self._touch(entry.principal.key_id)
        key_id_var.set(entry.principal.key_id)  # for the request's log lines, until it ends
        return entry.principal

    async def _read(self, prefix: str) -> _CachedKey:
        async with self._storage.unit_of_work() as uow:
            page = await uow.repo(ApiKey).find(Where.eq("key_prefix", prefix), limit=1)
            key = page.items[0] if page.items else None
            if key is None:
                return _UNKNOWN
            team = await uow.repo(Team).get(key.team_id) if key.team_id else None
        return _CachedKey(
            found=True,
            secret_hash=key.secret_hash,
            status=key.status,
            expires_at=key.expires_at,
            team_active=team is None or team.status is TeamStatus.ACTIVE,
            principal=principal_of(key),
        )

    def invalidate_all(self) -> None:
        """Forget every cached key in this process (tests, and changes to teams)."""
        self._cache.clear()

    def _forget(self, prefix: str) -> None:
        if prefix == ALL:
            self._cache.clear()
        else:
            self._cache.forget(prefix)

    # -- last use ---------------------------------------------------------------------------

    def _touch(self, key_id: str) -> None:
        now = time.monotonic()
        if now - self._touched.get(key_id, float("-inf")) < LAST_USED_EVERY_SECONDS:
            return
        self._touched[key_id] = now
        self._pending[key_id] = utcnow()
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self.flush_last_used(), name="keys-last-used")

    async def flush_last_used(self) -> None:
        """Write the pending `last_used_at` instants (one short transaction per batch)."""
        while self._pending:
            batch, self._pending = self._pending, {}
            try:
                async with self._storage.unit_of_work() as uow:
                    repo = uow.repo(ApiKey)
                    for key in await repo.get_many(list(batch)):
                        key.last_used_at = batch[key.id]
                        await repo.update(key)
                    await uow.commit()
            except StaleVersion:
                pass  # an administrator changed a key meanwhile; its next use records the time
            except Exception as exc:
                log.warning("cannot record when %d API keys were last used: %s", len(batch), exc)

    async def close(self) -> None:
        """Write what is pending before the process exits."""
        if self._flusher is not None and not self._flusher.done():
            with contextlib.suppress(Exception):
                await self._flusher
        await self.flush_last_used()


def _event_data(key: ApiKey, actor: str | None) -> dict[str, Any]:
    return {"id": key.id, "name": key.name, "team_id": key.team_id, "actor": actor}

"""Users of the admin interface: accounts, Argon2 passwords, sign-in sessions and sign-out."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

import redis.asyncio as aioredis

from app.access.entities import User, UserStatus
from app.access.passwords import burn_verification, hash_password, needs_rehash, verify_password
from app.access.service import Principal
from app.access.throttle import LoginThrottle
from app.access.tokens import TokenClaims, TokenCodec
from app.core.clock import utcnow
from app.core.errors import (
    Conflict,
    DuplicateKey,
    InvalidInput,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from app.core.ids import new_id
from app.storage.protocol import Page, Storage, UnitOfWork, Where
from app.storage.reads import get_existing, read_page

_REVOKED = "gateway:session:revoked:"
MIN_PASSWORD_LENGTH = 8
_SIGN_IN_FAILED = "Incorrect username or password"


class UserService:
    """Accounts and their sessions; a session is a signed token that sign-out revokes."""

    def __init__(
        self,
        storage: Storage,
        redis: aioredis.Redis,
        tokens: TokenCodec,
        throttle: LoginThrottle | None = None,
    ) -> None:
        self._storage = storage
        self._redis = redis
        self.tokens = tokens
        self._throttle = throttle

    # -- accounts ---------------------------------------------------------------------------

    async def bootstrap_admin(
        self, *, username: str, password: str | None
    ) -> tuple[User, str | None] | None:
        """Create the first administrator when there is no user at all.

        Returns the user and the generated password (None when `password` was given), or None
        when users already exist.
        """
        async with self._storage.unit_of_work() as uow:
            if await uow.repo(User).count() > 0:
                return None
        generated = None if password else secrets.token_urlsafe(18)
        try:
            user = await self.create_user(
                username=username, password=password or str(generated), is_admin=True
            )
        except DuplicateKey:
            return None  # another process bootstrapped it at the same moment
        return user, generated

    async def create_user(self, *, username: str, password: str, is_admin: bool = False) -> User:
        _check_password(password)
        user = User(
            id=new_id("user"),
            username=username,
            password_hash=await hash_password(password),
            is_admin=is_admin,
        )
        async with self._storage.unit_of_work() as uow:
            if await _by_username(uow, username) is not None:
                raise DuplicateKey(f"username '{username}' is taken", param="username")
            user = await uow.repo(User).add(user)
            await uow.commit()
        return user

    async def get_user(self, user_id: str) -> User:
        async with self._storage.unit_of_work() as uow:
            return await _load(uow, user_id)

    async def list_users(self, *, limit: int = 20, after: str | None = None) -> Page[User]:
        return await read_page(self._storage, User, order_by=["username"], limit=limit, after=after)

    async def update_user(self, user_id: str, changes: Mapping[str, Any]) -> User:
        """Change password, admin rights or status; the last active administrator stays one."""
        new_hash = None
        if changes.get("password") is not None:
            _check_password(changes["password"])
            new_hash = await hash_password(changes["password"])
        async with self._storage.unit_of_work() as uow:
            user = await _load(uow, user_id)
            was_admin = _active_admin(user)
            if "is_admin" in changes and changes["is_admin"] is not None:
                user.is_admin = bool(changes["is_admin"])
            if "status" in changes and changes["status"] is not None:
                user.status = UserStatus(changes["status"])
            if new_hash is not None:
                user.password_hash = new_hash
            if was_admin and not _active_admin(user):
                await _keep_an_admin(uow, user_id)
            user = await uow.repo(User).update(user)
            await uow.commit()
        return user

    async def delete_user(self, user_id: str) -> None:
        async with self._storage.unit_of_work() as uow:
            if _active_admin(await _load(uow, user_id)):
                await _keep_an_admin(uow, user_id)
            # Memberships go with the user (the reference cascades).
            await uow.repo(User).delete(user_id)
            await uow.commit()

    # -- sessions ---------------------------------------------------------------------------

    async def login(
        self, *, username: str, password: str, address: str | None = None
    ) -> tuple[str, TokenClaims, User]:
        """A session token for valid credentials of an active user; `Unauthenticated` otherwise,
        and `LoginThrottled` while the account or the client `address` is locked."""
        if self._throttle is not None:
            # Before the password hash: a flood of guesses costs one Redis call each.
            await self._throttle.attempt(username=username, address=address)
        async with self._storage.unit_of_work() as uow:
            user = await _by_username(uow, username)
        if user is None:
            await burn_verification(password)
            raise Unauthenticated(_SIGN_IN_FAILED)
        if not await verify_password(user.password_hash, password):
            raise Unauthenticated(_SIGN_IN_FAILED)
        if user.status is not UserStatus.ACTIVE:
            raise Unauthenticated(f"user '{username}' is {user.status.value}")
        upgraded = await hash_password(password) if needs_rehash(user.password_hash) else None
        async with self._storage.unit_of_work() as uow:
            current = await _load(uow, user.id)
            current.last_login_at = utcnow()
            if upgraded is not None:
                current.password_hash = upgraded
            user = await uow.repo(User).update(current)
            await uow.commit()
        if self._throttle is not None:
            await self._throttle.succeeded(username=username, address=address)
        token, claims = self.tokens.issue(user.id)
        return token, claims, user

    async def session(self, token: str) -> tuple[User, TokenClaims]:
        """The active user a valid, unrevoked token belongs to."""
        claims = self.tokens.verify(token)
        try:
            revoked = await self._redis.exists(_REVOKED + claims.token_id)
        except Exception as exc:
            # Without the revocation list a signed-out token could pass: refuse instead.
            raise Unavailable("cannot check the session right now; try again") from exc
        if revoked:
            raise Unauthenticated("Session token has been revoked")
        async with self._storage.unit_of_work() as uow:
            user = await uow.repo(User).get(claims.user_id)
        if user is None or user.status is not UserStatus.ACTIVE:
            raise Unauthenticated("Session token no longer belongs to an active user")
        return user, claims

    async def logout(self, claims: TokenClaims) -> None:
        """Revoke the token until it would have expired anyway."""
        remaining = int((claims.expires_at - utcnow()).total_seconds()) + 1
        if remaining > 0:
            await self._redis.set(_REVOKED + claims.token_id, b"1", ex=remaining)

    async def admin_principal(self, token: str) -> Principal:
        """The principal of an administrator's session; a non-administrator is refused."""
        user, _ = await self.session(token)
        if not user.is_admin:
            raise PermissionDenied("this route requires an administrator")
        return Principal(key_id=f"user:{user.id}", team_id=None, admin=True, user_id=user.id)


def _active_admin(user: User) -> bool:
    return user.is_admin and user.status is UserStatus.ACTIVE


def _check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise InvalidInput(
            f"password must be at least {MIN_PASSWORD_LENGTH} characters", param="password"
        )


async def _load(uow: UnitOfWork, user_id: str) -> User:
    return await get_existing(uow.repo(User), user_id, "user", param="id")


async def _by_username(uow: UnitOfWork, username: str) -> User | None:
    page = await uow.repo(User).find(Where.eq("username", username), limit=1)
    return page.items[0] if page.items else None


async def _keep_an_admin(uow: UnitOfWork, leaving: str) -> None:
    others = await uow.repo(User).count(
        Where.eq("is_admin", True),
        Where.eq("status", UserStatus.ACTIVE),
        Where.ne("id", leaving),
    )
    if others == 0:
        raise Conflict("the last active administrator cannot be removed, suspended or demoted")

"""Argon2id password hashes, computed on a worker thread so the event loop never waits."""

from __future__ import annotations

import asyncio

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

# OWASP's recommended Argon2id set-up (19 MiB, 2 passes, 1 lane): about 40 ms per hash here,
# which keeps sign-ins and start-ups quick while making offline guessing expensive.
_hasher = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)
_dummy_hash: str | None = None


async def hash_password(password: str) -> str:
    return await asyncio.to_thread(_hasher.hash, password)


async def verify_password(password_hash: str, password: str) -> bool:
    """Whether `password` matches; never raises for a wrong password or a malformed hash."""

    def verify() -> bool:
        try:
            return _hasher.verify(password_hash, password)
        except (VerificationError, InvalidHashError):
            return False

    return await asyncio.to_thread(verify)


async def burn_verification(password: str) -> None:
    """Spend the time of one verification, so an unknown user name answers no faster."""
    global _dummy_hash
    if _dummy_hash is None:
        _dummy_hash = await hash_password("not a password of anyone")
    await verify_password(_dummy_hash, password)


def needs_rehash(password_hash: str) -> bool:
    return _hasher.check_needs_rehash(password_hash)

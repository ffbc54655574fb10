"""Sign-in throttling: failures counted per account and per client address in Redis, shared by
every process, and a lock that doubles each time it is imposed."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from app.config import Settings
from app.core.errors import LoginThrottled

log = logging.getLogger(__name__)

_PREFIX = "gateway:login:"
# Each subject (`user:<name>`, `addr:<address>`) has a failures counter, a lock and a strike count.
_PARTS = ("fails:", "lock:", "strikes:")
# How long the number of locks already imposed on a subject is remembered after the last one,
# so a patient attacker keeps meeting the longest lock instead of starting again from 1 s.
_STRIKE_MEMORY_MS = 24 * 3600 * 1000

# KEYS: per subject its failures counter, lock and strikes. ARGV: the window, first lock, longest
# lock and strike memory (all ms), then each subject's budget. While any subject is locked the
# attempt is refused without being counted; otherwise it counts as a failure until a success
# takes it back, so parallel attempts beyond the budget are refused before any password check.
# Returns {wait ms, index of the subject that locked (1-based, 0: none), 1 if the lock is new}.
_ATTEMPT = """
local window, first, longest, memory = tonumber(ARGV[1]), tonumber(ARGV[2]),
    tonumber(ARGV[3]), tonumber(ARGV[4])
local subjects = #KEYS / 3
for i = 0, subjects - 1 do
    local wait = redis.call('PTTL', KEYS[3 * i + 2])
    if wait > 0 then return {wait, i + 1, 0} end
end
for i = 0, subjects - 1 do
    local failures, lock, strikes = KEYS[3 * i + 1], KEYS[3 * i + 2], KEYS[3 * i + 3]
    local count = redis.call('INCR', failures)
    if count == 1 then redis.call('PEXPIRE', failures, window) end
    if count > tonumber(ARGV[5 + i]) then
        local strike = redis.call('INCR', strikes)
        redis.call('PEXPIRE', strikes, memory)
        local wait = math.floor(math.min(first * 2 ^ math.min(strike - 1, 40), longest))
        redis.call('SET', lock, strike, 'PX', wait)
        redis.call('DEL', failures)
        return {wait, i + 1, 1}
    end
end
return {0, 0, 0}
"""

# KEYS: the account's failures counter and strikes, then the address's failures counter (if
# any). A success clears the account's record and takes its own attempt back from the address.
_SUCCEEDED = """
redis.call('DEL', KEYS[1], KEYS[2])
if KEYS[3] and tonumber(redis.call('GET', KEYS[3]) or '0') > 0 then
    redis.call('DECR', KEYS[3])
end
return 0
"""


@dataclass(frozen=True, slots=True)
class ThrottleLimits:
    """Failures allowed per account and per address in a window (0: no limit), and the lock."""

    account_failures: int
    address_failures: int
    window_seconds: float
    lock_seconds: float
    lock_max_seconds: float

    @classmethod
    def of(cls, settings: Settings) -> ThrottleLimits:
        return cls(
            account_failures=settings.LOGIN_MAX_FAILURES,
            address_failures=settings.LOGIN_ADDRESS_MAX_FAILURES,
            window_seconds=settings.LOGIN_FAILURE_WINDOW_SECONDS,
            lock_seconds=settings.LOGIN_LOCK_SECONDS,
            lock_max_seconds=settings.LOGIN_LOCK_MAX_SECONDS,
        )


class LoginThrottle:
    """Refuses sign-ins for a locked account or address before any password is checked.

    Without Redis it lets sign-ins through with a warning: passwords are still verified, and
    refusing would lock every user out while Redis is down.
    """

    def __init__(self, redis: aioredis.Redis, limits: ThrottleLimits) -> None:
        self._limits = limits
        self._attempt = redis.register_script(_ATTEMPT)
        self._succeeded = redis.register_script(_SUCCEEDED)

    def _subjects(self, username: str, address: str | None) -> list[tuple[str, str, int]]:
        """(what the log calls it, key stem, budget) of each throttled subject."""
        subjects = []
        if self._limits.account_failures > 0:
            subjects.append(
                (f"account '{username}'", f"user:{username}", self._limits.account_failures)
            )
        if address and self._limits.address_failures > 0:
            subjects.append(
                (f"address {address}", f"addr:{address}", self._limits.address_failures)
            )
        return subjects

    async def attempt(self, *, username: str, address: str | None) -> None:
        """Count a sign-in attempt; `LoginThrottled` while the account or address is locked."""
        subjects = self._subjects(username, address)
        if not subjects:
            return
        keys = [_PREFIX + part + stem for _, stem, _ in subjects for part in _PARTS]
        limits = self._limits
        args = [
            max(1, round(limits.window_seconds * 1000)),
            max(1, round(limits.lock_seconds * 1000)),
            max(1, round(limits.lock_max_seconds * 1000)),
            _STRIKE_MEMORY_MS,
            *(budget for _, _, budget in subjects),
        ]
        try:
            wait_ms, locked, new = await self._attempt(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            log.warning(
                "sign-in throttling is off for user '%s' from %s: Redis failed (%s); the "
                "password is still checked",
                username,
                address,
                exc,
            )
            return
        if not wait_ms:
            return
        wait = int(wait_ms) / 1000
        which, _, budget = subjects[int(locked) - 1]
        if new:
            log.warning(
                "sign-in locked for %g s: %s went over %d failed attempts (user '%s' from %s)",
                wait,
                which,
                budget,
                username,
                address,
            )
        raise LoginThrottled(
            f"Too many failed sign-in attempts; try again in {max(1, math.ceil(wait))} s",
            retry_after=wait,
        )

    async def succeeded(self, *, username: str, address: str | None) -> None:
        """Forget the account's failures and take this attempt back from the address's count."""
        keys = [_PREFIX + "fails:user:" + username, _PREFIX + "strikes:user:" + username]
        if address and self._limits.address_failures > 0:
            keys.append(_PREFIX + "fails:addr:" + address)
        try:
            await self._succeeded(keys=keys)
        except (RedisError, OSError) as exc:
            log.warning("could not clear the failed sign-ins of user '%s': %s", username, exc)

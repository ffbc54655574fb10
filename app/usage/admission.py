"""Admission: a call checked against the rate limits of its key and team, and its tokens and
maximum cost reserved against every applicable budget, before it is made.

`AdmissionControl.admit` does both in one Lua script (`ADMIT`), so the limits hold across every API
process and concurrent calls cannot overshoot a hard budget by more than one call's maximum
cost. A call without `max_tokens` reserves a default output allowance that need not fit
(`output_reservation`): a limit smaller than that allowance still admits calls whose input
fits. Settlement (app/usage/settlement.py) later puts the real counts in place of the
reservations.

Rate limits use fixed windows (a minute and a UTC day), one counter per window: one
INCRBY per limit and exact counts, at the price of allowing up to twice a limit across
a window boundary.

The limits, budgets and prices admission reads are cached per process (see
`AdmissionControl`); its script travels in the Redis round trip it shares with other
admissions and with counter corrections (app/usage/pipeline.py).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NoReturn, Protocol

from redis.exceptions import RedisError

from app.access.entities import ApiKey, Team
from app.core.clock import utcnow
from app.core.errors import BudgetExceeded, RateLimited, Unavailable
from app.core.invalidation import ALL, METERING_TOPIC, InvalidationBus
from app.core.loading import LoadingCache
from app.credentials.entities import Provider
from app.models.entities import Model
from app.storage.protocol import Storage
from app.usage.budgets import BudgetService, applies, committed_usage, counter_key, counter_ttl
from app.usage.entities import Budget
from app.usage.limits import DAY, MINUTE, RateLimits
from app.usage.pipeline import CounterPipeline
from app.usage.pricing import model_cost_micros

log = logging.getLogger(__name__)

# KEYS: the rate counters, the budget counters, then `EPOCH_KEY`. ARGV[1]: how many rate
# counters; then per rate counter: limit, amount, firm amount, ttl in ms; then per budget
# counter: limit, amount, firm amount; last, an epoch to start should Redis have none. A
# counter refuses a call when it is full or the call's firm amount (its input, and its output
# when the client capped it) does not fit; the whole amount is reserved. Returns
# {1, rate values..., epoch} when admitted, {0, i, value} when rate counter i is full,
# {2, j, value} when budget j would be crossed, {3, j...} when budget counters are missing.
ADMIT = """
local n_rate = tonumber(ARGV[1])
local n = #KEYS - 1
local epoch = redis.call('GET', KEYS[#KEYS])
if not epoch then
  epoch = ARGV[#ARGV]
  redis.call('SET', KEYS[#KEYS], epoch)
end
local missing = {}
for j = n_rate + 1, n do
  if redis.call('EXISTS', KEYS[j]) == 0 then missing[#missing + 1] = j - n_rate end
end
if #missing > 0 then
  table.insert(missing, 1, 3)
  return missing
end
local values = {}
for i = 1, n_rate do
  local limit = tonumber(ARGV[4 * i - 2])
  local firm = tonumber(ARGV[4 * i])
  local current = tonumber(redis.call('GET', KEYS[i]) or '0')
  if current >= limit or current + firm > limit then return {0, i, current} end
end
local base = 1 + 4 * n_rate
for j = 1, n - n_rate do
  local limit = tonumber(ARGV[base + 3 * j - 2])
  local firm = tonumber(ARGV[base + 3 * j])
  local current = tonumber(redis.call('GET', KEYS[n_rate + j]))
  if current >= limit or current + firm > limit then return {2, j, current} end
end
for i = 1, n_rate do
  values[i] = redis.call('INCRBY', KEYS[i], ARGV[4 * i - 1])
  if redis.call('PTTL', KEYS[i]) < 0 then redis.call('PEXPIRE', KEYS[i], ARGV[4 * i + 1]) end
end
for j = 1, n - n_rate do
  redis.call('INCRBY', KEYS[n_rate + j], ARGV[base + 3 * j - 1])
end
table.insert(values, 1, 1)
values[#values + 1] = epoch
return values
"""

# Which life of Redis's data the counters belong to: set by the first admission that finds it
# missing (a Redis that restarted empty, a flushed database), and checked by every correction
# (app/usage/pipeline.py), so that a correction of a reservation Redis lost is never applied
# to a counter rebuilt since from the recorded spend, which would count the call below zero.
EPOCH_KEY = "gateway:counters:epoch"

_NO_LIMITS = RateLimits()
_REBUILD_ATTEMPTS = 3

_DEFAULT_KEYS = {
    "requests_per_minute": "rate_limit.requests_per_minute",
    "tokens_per_minute": "rate_limit.tokens_per_minute",
    "requests_per_day": "rate_limit.requests_per_day",
    "tokens_per_day": "rate_limit.tokens_per_day",
}


class ConfigLookup(Protocol):
    """Reads one application setting by key (None when it is not set)."""

    def __call__(self, key: str) -> Awaitable[Any]: ...


@dataclass(frozen=True, slots=True)
class Caller:
    """Who a call is made for, when there is no request principal (a job's owner)."""

    key_id: str | None
    team_id: str | None


class KeyAndTeam(Protocol):
    """Whose limits and budgets a call counts against: a request principal, or a `Caller`."""

    @property
    def key_id(self) -> str | None: ...

    @property
    def team_id(self) -> str | None: ...


@dataclass(slots=True)
class _Counter:
    key: str
    dimension: str  # "requests" or "tokens"
    limit: int
    amount: int  # reserved
    firm: int  # the part of `amount` that must fit under `limit`
    reset_at: float  # unix seconds
    scope: str  # "key" or "team"


@dataclass
class Admission:
    """An admitted call: its reservations, and the rate-limit headers to answer with."""

    key_id: str | None
    team_id: str | None
    model_id: str
    model: Model
    reserved_tokens: int
    reserved_cost_micros: int
    headers: dict[str, str]
    rate_keys: list[tuple[str, str]]  # (counter key, dimension)
    budget_keys: list[str]
    budget_ids: list[str] = field(default_factory=list)  # of `budget_keys`, in their order
    epoch: str = ""  # the counters' epoch it was admitted in (`EPOCH_KEY`)
    started: float = field(default_factory=time.monotonic)
    finished: bool = False


def output_reservation(
    model: Model, prompt_tokens: int, max_output_tokens: int | None, default: int
) -> tuple[int, int]:
    """The output tokens to reserve for a call, and how many of them must fit under a limit.

    A client's `max_tokens` is a cap the call may use in full, so all of it must fit. Without
    one the call reserves an allowance (`default`, or less when the model's own `max_tokens`
    is lower) that a limit or budget need not hold: the call is admitted while its input fits,
    and settlement puts the real count in place of the allowance. Either way no more than the
    model's context window leaves after the input is reserved.
    """
    firm = max_output_tokens is not None
    output = max(0, max_output_tokens) if max_output_tokens is not None else default
    if not firm:
        # What the upstream is sent when the client sets nothing (`chat.SAMPLING_DEFAULTS`).
        configured = model.parameters.get("max_completion_tokens") or model.parameters.get(
            "max_tokens"
        )
        if isinstance(configured, int) and 0 < configured < output:
            output = configured
    if model.context_window is not None:
        output = min(output, max(0, model.context_window - prompt_tokens))
    return output, output if firm else 0


class AdmissionControl:
    """Admits calls: rate limits and budget reservations, and the cached values they need."""

    def __init__(
        self,
        storage: Storage,
        redis: Any,
        budgets: BudgetService,
        pipeline: CounterPipeline,
        *,
        default_limits: RateLimits,
        default_max_output_tokens: int,
        cache_seconds: float,
        redis_timeout: float,
        config: ConfigLookup | None,
        bus: InvalidationBus,
    ) -> None:
        self._storage = storage
        self._redis = redis
        self._pipeline = pipeline  # carries `ADMIT`
        self._fallback_limits = default_limits
        self._default_max_output_tokens = default_max_output_tokens
        self._redis_timeout = redis_timeout
        self._config = config
        # Forgotten in every process when the admin API changes them (`METERING_TOPIC`), and
        # refreshed every `cache_seconds` (every second at most while such messages cannot
        # arrive); a value expired less than that ago is answered while its refresh runs, so
        # no call waits for the database.
        self._bus = bus
        limits = functools.partial(
            LoadingCache,
            ttl=lambda _value: self._bus.ttl(cache_seconds),
            grace=cache_seconds,
            max_entries=10_000,
        )
        self._key_limits: LoadingCache[str, RateLimits] = limits(self._read_key_limits)
        self._team_limits: LoadingCache[str, RateLimits] = limits(self._read_team_limits)
        self._default_limits: LoadingCache[str, RateLimits] = limits(self._read_default_limits)
        self._models: LoadingCache[str, Model] = limits(self._read_model)
        self._parsed: dict[int, tuple[Mapping[str, Any], RateLimits]] = {}
        self._applicable_budgets: dict[
            tuple[str | None, str | None, str], tuple[list[Budget], int, list[Budget], list[str]]
        ] = {}
        self._plans: dict[
            tuple[str | None, str | None],
            tuple[RateLimits, RateLimits, RateLimits | None, list[tuple[str, str, str, int, int]]],
        ] = {}
        self._enabled_budgets: LoadingCache[str, list[Budget]] = limits(
            lambda _enabled: budgets.enabled()
        )
        self._bus.on(METERING_TOPIC, self.forget)

    def forget(self, item: str) -> None:
        """Drop the cached copy of what `item` (a `METERING_TOPIC` item) names."""
        kind, _, name = item.partition(":")
        if kind == "budgets":
            self._enabled_budgets.clear()
        elif kind == "key" and name:
            self._key_limits.forget(name)
        elif kind == "team" and name:
            self._team_limits.forget(name)
        elif kind == "model" and name:
            self._models.forget(name)
        elif kind == "defaults":
            self._default_limits.clear()
        else:  # ALL (a lost subscription) or an item of a newer release: drop everything
            if item != ALL:
                log.warning("unknown metering invalidation %r; dropping every cached entry", item)
            for cache in (
                self._enabled_budgets,
                self._key_limits,
                self._team_limits,
                self._models,
                self._default_limits,
            ):
                cache.clear()

    async def admit(
        self,
        principal: KeyAndTeam,
        model: Model | str,
        estimated_input_tokens: int,
        max_output_tokens: int | None,
    ) -> Admission:
        """Check the rate limits and reserve tokens and maximum cost; raises when refused.

        `model` is the model (or its id) that will answer first; a fallback's price is
        reconciled at `settle`. `max_output_tokens` is the client's cap (`max_tokens`), None
        when it set none; see `output_reservation` for what is reserved then.
        """
        if isinstance(model, str):
            model = await self.model(model)
        prompt = max(0, estimated_input_tokens)
        output, firm_output = output_reservation(
            model, prompt, max_output_tokens, self._default_max_output_tokens
        )
        tokens = prompt + output
        cost = model_cost_micros(model, prompt, output)
        firm_cost = cost if firm_output == output else model_cost_micros(model, prompt, firm_output)
        now = time.time()
        counters = await self._counters(principal, tokens, prompt + firm_output, now)
        budgets, budget_keys = self._applicable(
            await self._enabled_budgets.get_or_load("enabled"),
            principal.key_id,
            principal.team_id,
            model.id,
            now,
        )
        keys = [c.key for c in counters] + budget_keys
        args: list[int | str] = [len(counters)]
        for c in counters:
            args += [c.limit, c.amount, c.firm, int((c.reset_at - now) * 1000) + 1000]
        for b in budgets:
            args += [b.hard_limit_micros, cost, firm_cost]
        result = await self._run_admit(keys, args, budgets)
        if result[0] == 0:
            counter = counters[int(result[1]) - 1]
            _refuse_rate(counter, int(result[2]), counters, now, prompt, max_output_tokens)
        if result[0] == 2:
            _refuse_budget(budgets[int(result[1]) - 1], int(result[2]), firm_cost)
        values = [int(v) for v in result[1:-1]]
        epoch = result[-1]
        return Admission(
            key_id=principal.key_id,
            team_id=principal.team_id,
            model_id=model.id,
            model=model,
            reserved_tokens=tokens,
            reserved_cost_micros=cost,
            headers=_headers(counters, values, now),
            rate_keys=[(c.key, c.dimension) for c in counters],
            budget_keys=budget_keys,
            budget_ids=[b.id for b in budgets],
            epoch=epoch.decode() if isinstance(epoch, bytes) else str(epoch),
        )

    def _applicable(
        self,
        enabled: list[Budget],
        key_id: str | None,
        team_id: str | None,
        model_id: str,
        now: float,
    ) -> tuple[list[Budget], list[str]]:
        """The budgets a call counts against, and their counters of the current period (kept
        while the same enabled budgets, cached for `cache_seconds`, apply, and the UTC day is
        the same: no period starts within a day)."""
        day = int(now // DAY)
        known = self._applicable_budgets.get((key_id, team_id, model_id))
        if known is not None and known[0] is enabled and known[1] == day:
            return known[2], known[3]
        budgets = [
            b for b in enabled if applies(b, key_id=key_id, team_id=team_id, model_id=model_id)
        ]
        at = datetime.fromtimestamp(now, UTC)
        keys = [counter_key(b, at) for b in budgets]
        if len(self._applicable_budgets) > 10_000:
            self._applicable_budgets.clear()
        self._applicable_budgets[key_id, team_id, model_id] = (enabled, day, budgets, keys)
        return budgets, keys

    async def _run_admit(
        self, keys: list[str], args: list[int | str], budgets: list[Budget]
    ) -> list[Any]:
        if not keys:
            return [1, ""]  # no limit and no budget applies: nothing to count
        keys = [*keys, EPOCH_KEY]
        args = [*args, uuid.uuid4().hex]
        try:
            for _ in range(_REBUILD_ATTEMPTS):
                result = await self._pipeline.admit(keys, args)
                if result[0] != 3:
                    return result
                async with asyncio.timeout(self._redis_timeout):
                    await self._rebuild([budgets[int(j) - 1] for j in result[1:]], utcnow())
        except (RedisError, TimeoutError) as exc:
            reason = str(exc) or "Redis did not answer in time"
            raise Unavailable(f"rate limits and budgets cannot be checked: {reason}") from exc
        raise Unavailable("budget counters could not be rebuilt; try again")

    async def _rebuild(self, budgets: list[Budget], at: datetime) -> None:
        """Recreate missing budget counters from the recorded spend of the current period."""
        async with self._storage.unit_of_work() as uow:
            fresh = await uow.repo(Budget).get_many([b.id for b in budgets])
        by_id = {b.id: b for b in fresh}
        for budget in budgets:
            current = by_id.get(budget.id, budget)
            ttl = counter_ttl(current, at)
            await self._redis.set(
                counter_key(current, at), committed_usage(current, at), nx=True, ex=ttl
            )

    async def _counters(
        self, principal: KeyAndTeam, tokens: int, firm_tokens: int, now: float
    ) -> list[_Counter]:
        own = getattr(principal, "rate_limits", None)
        if isinstance(own, Mapping):
            key_limits = self._parsed_limits(own)
        elif principal.key_id is not None:
            key_limits = await self._key_limits.get_or_load(principal.key_id)
        else:
            key_limits = _NO_LIMITS
        defaults = await self._default_limits.get_or_load("defaults")
        team_id = principal.team_id
        team_limits = await self._team_limits.get_or_load(team_id) if team_id is not None else None
        plan = self._plan(principal.key_id, team_id, key_limits, defaults, team_limits)
        counters = []
        for scope, prefix, dimension, window, limit in plan:
            bucket = int(now // window)
            requests = dimension == "requests"
            counters.append(
                _Counter(
                    key=f"{prefix}{bucket}",
                    dimension=dimension,
                    limit=limit,
                    amount=1 if requests else tokens,
                    firm=1 if requests else firm_tokens,
                    reset_at=(bucket + 1) * window,
                    scope=scope,
                )
            )
        return counters

    def _parsed_limits(self, own: Mapping[str, Any]) -> RateLimits:
        """A principal's own `rate_limits`, parsed once per mapping (principals are cached)."""
        known = self._parsed.get(id(own))
        if known is not None and known[0] is own:
            return known[1]
        limits = RateLimits.from_json(dict(own))
        if len(self._parsed) > 10_000:
            self._parsed.clear()
        self._parsed[id(own)] = (own, limits)  # holding `own` keeps its id from being reused
        return limits

    def _plan(
        self,
        key_id: str | None,
        team_id: str | None,
        key_limits: RateLimits,
        defaults: RateLimits,
        team_limits: RateLimits | None,
    ) -> list[tuple[str, str, str, int, int]]:
        """`(scope, counter key prefix, dimension, window, limit)` of every limit on the caller,
        kept while the same limit objects (cached for `cache_seconds`) apply."""
        known = self._plans.get((key_id, team_id))
        if (
            known is not None
            and known[0] is key_limits
            and known[1] is defaults
            and known[2] is team_limits
        ):
            return known[3]
        scopes: list[tuple[str, str, RateLimits]] = []
        if key_id is not None:
            scopes.append(("key", key_id, key_limits.over(defaults)))
        if team_id is not None and team_limits is not None:
            scopes.append(("team", team_id, team_limits))
        plan = [
            (
                scope,
                f"gateway:rl:{scope}:{scope_id}:{dimension}:{window}:",
                dimension,
                window,
                limit,
            )
            for scope, scope_id, limits in scopes
            for dimension, window, limit in limits.windows()
        ]
        if len(self._plans) > 10_000:
            self._plans.clear()
        self._plans[key_id, team_id] = (key_limits, defaults, team_limits, plan)
        return plan

    async def _read_key_limits(self, key_id: str) -> RateLimits:
        async with self._storage.unit_of_work() as uow:
            key = await uow.repo(ApiKey).get(key_id)
        return RateLimits.from_json(key.rate_limits if key is not None else None)

    async def _read_default_limits(self, _defaults: str) -> RateLimits:
        """The limits of a key without its own: app configuration, else the settings."""
        limits = self._fallback_limits
        if self._config is not None:
            try:
                values = {name: await self._config(key) for name, key in _DEFAULT_KEYS.items()}
            except Exception:
                log.warning("app configuration unavailable; default limits from settings")
            else:
                if any(v is not None for v in values.values()):
                    # 0 stands for "unlimited" in the app configuration.
                    limits = RateLimits.from_json({k: v for k, v in values.items() if v})
        return limits

    async def _read_team_limits(self, team_id: str) -> RateLimits:
        async with self._storage.unit_of_work() as uow:
            team = await uow.repo(Team).get(team_id)
        return RateLimits.from_json(team.rate_limits if team is not None else None)

    async def model(self, model_id: str) -> Model:
        """The model's prices (cached: they change rarely, and a stale price is reconciled)."""
        return await self._models.get_or_load(model_id)

    async def _read_model(self, model_id: str) -> Model:
        async with self._storage.unit_of_work() as uow:
            found = await uow.repo(Model).get(model_id)
        # An unknown model (removed meanwhile) is priced at zero rather than failing the call.
        return found or Model(id=model_id, name=model_id, provider=Provider.MOCK, provider_model="")


def _refuse_rate(
    counter: _Counter,
    value: int,
    counters: list[_Counter],
    now: float,
    prompt: int,
    max_output_tokens: int | None,
) -> NoReturn:
    """Raise `RateLimited` for `counter`, which holds `value`, with the headers to answer."""
    retry_after = max(0.0, counter.reset_at - now)
    window = "minute" if counter.reset_at - now <= MINUTE else "day"
    if counter.firm > counter.limit:
        # No window will ever admit it: say which limit, and what to change.
        owner = "this API key" if counter.scope == "key" else "the team"
        needs = f"about {prompt} tokens of input (estimated)"
        fix = "shorten the input"
        if max_output_tokens is not None and counter.firm > prompt:
            needs += f" plus {counter.firm - prompt} of max_tokens"
            fix = "lower max_tokens or shorten the input"
        message = (
            f"this request needs {needs}, more than {owner}'s limit of {counter.limit} "
            f"tokens per {window} (tokens_per_{window}): {fix}"
        )
    else:
        message = (
            f"rate limit reached: {counter.limit} {counter.dimension} per {window}; "
            f"try again in {math.ceil(retry_after)} s"
        )
    values = [value if c is counter else 0 for c in counters]
    raise RateLimited(
        message,
        retry_after=retry_after,
        headers=_headers(counters, values, now, refused=counter),
    )


def _refuse_budget(budget: Budget, used: int, firm_cost: int) -> NoReturn:
    """Raise `BudgetExceeded` for `budget`, of which `used` is spent or reserved."""
    name = f"budget '{budget.name}' ({budget.scope.value}, {budget.period.value})"
    if used >= budget.hard_limit_micros:
        message = f"{name} is used up: {used} of {budget.hard_limit_micros} micro-dollars spent"
    else:
        message = (
            f"{name} has no room for this request: {used} of "
            f"{budget.hard_limit_micros} micro-dollars used, this request may cost up "
            f"to {firm_cost}"
        )
    raise BudgetExceeded(message, budget_id=budget.id)


def _headers(
    counters: list[_Counter], values: list[int], now: float, *, refused: _Counter | None = None
) -> dict[str, str]:
    """`x-ratelimit-{limit,remaining,reset}-{requests,tokens}` of the tightest counter."""
    headers: dict[str, str] = {}
    for dimension in ("requests", "tokens"):
        tightest: tuple[int, _Counter] | None = None
        for counter, value in zip(counters, values, strict=True):
            if counter.dimension != dimension:
                continue
            remaining = 0 if counter is refused else max(0, counter.limit - value)
            if tightest is None or remaining < tightest[0]:
                tightest = (remaining, counter)
        if tightest is None:
            continue
        remaining, counter = tightest
        headers[f"x-ratelimit-limit-{dimension}"] = str(counter.limit)
        headers[f"x-ratelimit-remaining-{dimension}"] = str(remaining)
        headers[f"x-ratelimit-reset-{dimension}"] = f"{max(0, math.ceil(counter.reset_at - now))}s"
    return headers

"""The facade the chat path calls: admit a call, then settle or release it.

`admit` checks the rate limits of the key and its team and reserves the call's estimated
tokens and maximum cost against every applicable budget, all in one Lua script, so the
limits hold across every API process and concurrent calls cannot overshoot a hard budget
by more than one call's maximum cost. A call without `max_tokens` reserves a default output
allowance that need not fit (`output_reservation`): a limit smaller than that allowance still
admits calls whose input fits. `settle` corrects the reservations with the real counts and
queues the usage record and execution log; `release` gives a call's reservations back when no
upstream call was made.

Per call this costs one Redis round trip: the corrections `settle` and `release` make are
queued and travel in the same pipeline as the next admission's script (or are sent right
after the call when no admission follows), and records are built as plain JSON rows.

Rate limits use fixed windows (a minute and a UTC day), one counter per window: one
INCRBY per limit and exact counts, at the price of allowing up to twice a limit across
a window boundary.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from redis.exceptions import NoScriptError, RedisError

from app.access.entities import ApiKey, Team
from app.core.clock import utcnow
from app.core.errors import (
    BudgetExceeded,
    DomainError,
    InvalidInput,
    NotFound,
    PermissionDenied,
    RateLimited,
    Unavailable,
)
from app.core.ids import new_id
from app.core.invalidation import ALL, METERING_TOPIC, InvalidationBus
from app.core.loading import LoadingCache
from app.credentials.entities import Provider
from app.logs.entities import ExecutionStatus, ExecutionType
from app.models.entities import Model
from app.storage.protocol import Storage
from app.usage.budgets import BudgetService, applies, committed_usage, counter_key, counter_ttl
from app.usage.entities import Budget, UsageStatus, UsageType
from app.usage.limits import DAY, MINUTE, RateLimits
from app.usage.pricing import model_cost_micros
from app.usage.recorder import AccountingBuffer

log = logging.getLogger(__name__)

T = TypeVar("T")

# KEYS: the rate counters, then the budget counters. ARGV[1]: how many rate counters; then
# per rate counter: limit, amount, firm amount, ttl in ms; then per budget counter: limit,
# amount, firm amount. A counter refuses a call when it is full or the call's firm amount (its
# input, and its output when the client capped it) does not fit; the whole amount is reserved.
# Returns {1, rate values...} when admitted, {0, i, value} when rate counter i is full,
# {2, j, value} when budget j would be crossed, {3, j...} when budget counters are missing.
_ADMIT = """
local n_rate = tonumber(ARGV[1])
local n = #KEYS
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
return values
"""

# Adds ARGV[i] to KEYS[i] when the counter still exists (an expired window stays expired).
_ADJUST = """
for i = 1, #KEYS do
  local delta = tonumber(ARGV[i])
  if delta ~= 0 and redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('INCRBY', KEYS[i], delta)
  end
end
return 1
"""

_NO_LIMITS = RateLimits()
_REBUILD_ATTEMPTS = 3
# How long corrections wait for an admission to carry them. Under load one always comes
# sooner; a lone caller's next call usually does too, which saves a Redis call per call.
_CORRECTION_DELAY = 0.02

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


class _Principal(Protocol):
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
    started: float = field(default_factory=time.monotonic)
    finished: bool = False


@dataclass(slots=True)  # not frozen: that costs five times as much to build, once per call
class UsageOutcome:
    """How an admitted call ended (success or upstream error)."""

    status: UsageStatus = UsageStatus.SUCCESS
    input_tokens: int = 0
    output_tokens: int = 0
    latency_ms: int | None = None  # measured from admission when not given
    cache_hit: bool = False
    operation_id: str | None = None
    model_id: str | None = None  # the model that answered, when a fallback did
    provider: str | None = None
    error: str | None = None
    usage_type: UsageType = UsageType.CHAT_COMPLETION
    is_async: bool = False
    # Kept in the execution log only when the application configuration allows bodies
    # (JSON values, or a pydantic model, dumped only then).
    request_body: Any = None
    response_body: Any = None
    workflow_steps: list[dict[str, Any]] = field(default_factory=list)
    cost_micros: int | None = None  # set by `Metering.priced`, computed at settlement if not


@dataclass(frozen=True, slots=True)
class MeteringOptions:
    default_limits: RateLimits = field(default_factory=RateLimits)
    default_max_output_tokens: int = 4096
    cache_seconds: float = 2.0
    log_bodies: bool = False
    # Bound on each Redis call of the hot path (its client may have no socket timeout, which
    # would cost a task per command in redis-py).
    redis_timeout: float = 5.0


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


# An admission to send: counter keys, script arguments, and (when it waits) its answer.
_Pending = tuple[list[str], list[int], "asyncio.Future[list[Any]] | None"]
_Waiting = tuple[list[str], list[int], "asyncio.Future[list[Any]]"]

_EXECUTION_TYPES = {
    UsageType.CHAT_COMPLETION: ExecutionType.CHAT_COMPLETION,
    UsageType.EMBEDDING: ExecutionType.EMBEDDING,
    UsageType.WORKFLOW: ExecutionType.WORKFLOW,
}


class Metering:
    """Rate limits, budget reservations and usage recording around one upstream call."""

    def __init__(
        self,
        storage: Storage,
        redis: Any,
        budgets: BudgetService,
        buffer: AccountingBuffer,
        options: MeteringOptions,
        *,
        config: ConfigLookup | None = None,
        owns_redis: bool = False,
        bus: InvalidationBus | None = None,
    ) -> None:
        self._storage = storage
        self._redis = redis
        self._owns_redis = owns_redis  # a client of its own, closed with this object
        self._budgets = budgets
        self.buffer = buffer
        self._options = options
        self.config = config
        self._admit_script = redis.register_script(_ADMIT)
        self._adjust_script = redis.register_script(_ADJUST)
        # Forgotten in every process when the admin API changes them (`METERING_TOPIC`), and
        # refreshed every `cache_seconds` (every second at most while such messages cannot
        # arrive); a value expired less than that ago is answered while its refresh runs, so
        # no call waits for the database.
        self._bus = bus or InvalidationBus(None, shared=False)
        lifetime = options.cache_seconds
        limits = functools.partial(
            LoadingCache,
            ttl=lambda _value: self._bus.ttl(lifetime),
            grace=lifetime,
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
        # Admissions waiting for the pipeline in flight to return, and the one being sent.
        self._admissions: list[_Waiting] = []
        self._in_flight = False
        self._sending: set[asyncio.Task[None]] = set()
        # Counter key -> delta not yet sent to Redis (see `_adjust`).
        self._corrections: dict[str, int] = {}
        self._corrector: asyncio.Task[None] | None = None
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
        principal: _Principal,
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
            model = await self._model(model)
        prompt = max(0, estimated_input_tokens)
        output, firm_output = output_reservation(
            model, prompt, max_output_tokens, self._options.default_max_output_tokens
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
        args: list[int] = [len(counters)]
        for c in counters:
            args += [c.limit, c.amount, c.firm, int((c.reset_at - now) * 1000) + 1000]
        for b in budgets:
            args += [b.hard_limit_micros, cost, firm_cost]
        result = await self._run_admit(keys, args, budgets)
        if result[0] == 0:
            counter = counters[int(result[1]) - 1]
            self._refuse_rate(counter, int(result[2]), counters, now, prompt, max_output_tokens)
        if result[0] == 2:
            budget = budgets[int(result[1]) - 1]
            used = int(result[2])
            name = f"budget '{budget.name}' ({budget.scope.value}, {budget.period.value})"
            if used >= budget.hard_limit_micros:
                message = (
                    f"{name} is used up: {used} of {budget.hard_limit_micros} micro-dollars spent"
                )
            else:
                message = (
                    f"{name} has no room for this request: {used} of "
                    f"{budget.hard_limit_micros} micro-dollars used, this request may cost up "
                    f"to {firm_cost}"
                )
            raise BudgetExceeded(message, budget_id=budget.id)
        values = [int(v) for v in result[1:]]
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
        self, keys: list[str], args: list[int], budgets: list[Budget]
    ) -> list[Any]:
        if not keys:
            return [1]  # no limit and no budget applies: nothing to count
        try:
            for _ in range(_REBUILD_ATTEMPTS):
                async with asyncio.timeout(self._options.redis_timeout):
                    result = await self._admit_with_corrections(keys, args)
                if result[0] != 3:
                    return result
                async with asyncio.timeout(self._options.redis_timeout):
                    await self._rebuild([budgets[int(j) - 1] for j in result[1:]], utcnow())
        except (RedisError, TimeoutError) as exc:
            reason = str(exc) or "Redis did not answer in time"
            raise Unavailable(f"rate limits and budgets cannot be checked: {reason}") from exc
        raise Unavailable("budget counters could not be rebuilt; try again")

    async def _admit_with_corrections(self, keys: list[str], args: list[int]) -> list[Any]:
        """The admission script's answer, sent behind the queued corrections so that it counts
        them and they cost no round trip of their own.

        One pipeline is in flight at a time: a call that finds none sends its own at once; the
        calls that arrive meanwhile wait and then travel together in the next one, so under
        load a round trip (and a client call) serves many admissions.
        """
        if self._in_flight:
            answer: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
            self._admissions.append((keys, args, answer))
            return await answer
        self._in_flight = True
        try:
            fixed, deltas = self._take_corrections()
            (reply,) = await self._pipeline(fixed, deltas, [(keys, args, None)])
        finally:
            self._in_flight = False
            self._send_waiting()
        if isinstance(reply, Exception):
            raise reply
        result: list[Any] = reply
        return result

    def _send_waiting(self) -> None:
        if self._in_flight or not self._admissions:
            return
        batch, self._admissions = self._admissions, []
        self._in_flight = True
        # A task of its own: a caller that goes away must not cancel the others' round trip.
        task = asyncio.get_running_loop().create_task(self._run_admissions(batch))
        self._sending.add(task)
        task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        self._in_flight = False
        self._send_waiting()

    async def _run_admissions(self, batch: list[_Waiting]) -> None:
        fixed, deltas = self._take_corrections()
        try:
            async with asyncio.timeout(self._options.redis_timeout):
                replies = await self._pipeline(fixed, deltas, batch)
        except BaseException as exc:
            if fixed:
                # Whether they were applied is unknown; sending them again could count twice.
                log.warning("rate-limit and budget corrections may be lost: %d", len(fixed))
            for _, _, answer in batch:
                if answer.done():
                    continue
                if isinstance(exc, Exception):
                    answer.set_exception(exc)
                else:
                    answer.cancel()  # shutting down: the callers are being cancelled too
            if not isinstance(exc, Exception):
                raise
            return
        for (_, _, answer), reply in zip(batch, replies, strict=True):
            if answer.done():
                continue  # its caller went away
            if isinstance(reply, Exception):
                answer.set_exception(reply)
            else:
                answer.set_result(reply)

    async def _pipeline(
        self, fixed: list[str], deltas: list[int], batch: Sequence[_Pending]
    ) -> list[Any]:
        # Plain EVALSHA: a pipeline given the script objects would first ask SCRIPT EXISTS,
        # a round trip of its own; a script Redis lost (restart) is loaded below instead.
        pipe = self._redis.pipeline(transaction=False)
        if fixed:
            pipe.evalsha(self._adjust_script.sha, len(fixed), *fixed, *deltas)
        for keys, args, _ in batch:
            pipe.evalsha(self._admit_script.sha, len(keys), *keys, *args)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        corrected_late = False
        if fixed:
            adjusted = replies.pop(0)
            if isinstance(adjusted, NoScriptError):
                try:
                    adjusted = await self._adjust_script(keys=fixed, args=deltas)
                except RedisError as exc:
                    adjusted = exc
                else:
                    # The admissions ran before these corrections: a refused one (which
                    # changed nothing) is asked again now that they are counted.
                    corrected_late = True
            if isinstance(adjusted, Exception):
                log.warning("could not correct rate-limit and budget counters: %s", adjusted)
        for index, (keys, args, _) in enumerate(batch):
            reply = replies[index]
            if isinstance(reply, NoScriptError) or (
                corrected_late and isinstance(reply, list) and reply[0] in (0, 2)
            ):
                try:
                    replies[index] = await self._admit_script(keys=keys, args=args)
                except RedisError as exc:
                    replies[index] = exc
        return replies

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

    def _refuse_rate(
        self,
        counter: _Counter,
        value: int,
        counters: list[_Counter],
        now: float,
        prompt: int,
        max_output_tokens: int | None,
    ) -> None:
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

    async def _counters(
        self, principal: _Principal, tokens: int, firm_tokens: int, now: float
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
        limits = self._options.default_limits
        if self.config is not None:
            try:
                values = {name: await self.config(key) for name, key in _DEFAULT_KEYS.items()}
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

    async def _model(self, model_id: str) -> Model:
        """The model's prices (cached: they change rarely, and a stale price is reconciled)."""
        return await self._models.get_or_load(model_id)

    async def _read_model(self, model_id: str) -> Model:
        async with self._storage.unit_of_work() as uow:
            found = await uow.repo(Model).get(model_id)
        # An unknown model (removed meanwhile) is priced at zero rather than failing the call.
        return found or Model(id=model_id, name=model_id, provider=Provider.MOCK, provider_model="")

    async def _answered_by(self, admission: Admission, outcome: UsageOutcome) -> Model:
        model = admission.model
        if outcome.model_id is not None and outcome.model_id != model.id:
            model = await self._model(outcome.model_id)
        return model

    async def priced(self, admission: Admission, outcome: UsageOutcome) -> int:
        """The call's cost in micro-dollars, as its usage record says it: kept on `outcome`, so
        a response header given it before settlement shows the very figure recorded."""
        if outcome.cost_micros is None:
            model = await self._answered_by(admission, outcome)
            outcome.cost_micros = (
                0
                if outcome.cache_hit
                else model_cost_micros(model, outcome.input_tokens, outcome.output_tokens)
            )
        return outcome.cost_micros

    async def settle(self, admission: Admission, outcome: UsageOutcome) -> None:
        """Correct the reservations with the real counts and queue the record and the log.

        Settling (or releasing) an admission a second time does nothing.
        """
        if admission.finished:
            return
        admission.finished = True
        model = await self._answered_by(admission, outcome)
        cost = await self.priced(admission, outcome)
        tokens = outcome.input_tokens + outcome.output_tokens
        await self._adjust(
            admission, tokens - admission.reserved_tokens, 0, cost - admission.reserved_cost_micros
        )
        latency = outcome.latency_ms
        if latency is None:
            latency = int((time.monotonic() - admission.started) * 1000)
        bodies = await self._log_bodies()
        success = outcome.status is UsageStatus.SUCCESS
        # Rows as the batch carries them (what `model_dump(mode="json")` of the entities gives):
        # building the table entities here would cost more than the rest of a call.
        stamp = utcnow().isoformat()
        record = {
            "id": new_id("usage"),
            "usage_type": outcome.usage_type.value,
            "api_key_id": admission.key_id,
            "team_id": admission.team_id,
            "model_id": model.id,
            "provider": outcome.provider or str(model.provider),
            "input_tokens": outcome.input_tokens,
            "output_tokens": outcome.output_tokens,
            "cost_micros": cost,
            "latency_ms": latency,
            "status": outcome.status.value,
            "cache_hit": outcome.cache_hit,
            "operation_id": outcome.operation_id,
            "error": outcome.error,
            "created_at": stamp,
            "updated_at": stamp,
            "version": 1,
        }
        entry = {
            "id": new_id("log"),
            "execution_type": _EXECUTION_TYPES.get(outcome.usage_type, ExecutionType.MODEL).value,
            "resource_id": model.id,
            "resource_name": model.name,
            "status": (ExecutionStatus.SUCCESS if success else ExecutionStatus.FAILED).value,
            "input": _jsonable(outcome.request_body) if bodies else None,
            "output": _jsonable(outcome.response_body) if bodies else None,
            "error": outcome.error,
            "cost_micros": cost,
            "input_tokens": outcome.input_tokens,
            "output_tokens": outcome.output_tokens,
            "execution_time_ms": latency,
            "api_key_id": admission.key_id,
            "user_id": None,
            "team_id": admission.team_id,
            "operation_id": outcome.operation_id,
            "is_async": outcome.is_async,
            "workflow_steps": list(outcome.workflow_steps) if bodies else [],
            "created_at": stamp,
            "updated_at": stamp,
            "version": 1,
        }
        self.buffer.add(record, entry)

    async def release(self, admission: Admission) -> None:
        """Give back everything `admission` reserved (no upstream call was made)."""
        if admission.finished:
            return
        admission.finished = True
        await self._adjust(
            admission, -admission.reserved_tokens, -1, -admission.reserved_cost_micros
        )

    async def _adjust(
        self, admission: Admission, token_delta: int, request_delta: int, cost_delta: int
    ) -> None:
        """Queue the corrections of `admission`'s counters; they reach Redis with the next
        admission's script (no round trip of their own) or, when none comes within
        `_CORRECTION_DELAY`, on their own.

        Until then a counter holds the reservation, the larger amount in the usual case, so a
        limit or budget errs on the side of refusing, never of letting a call through.
        """
        pending = self._corrections
        for key, dimension in admission.rate_keys:
            delta = token_delta if dimension == "tokens" else request_delta
            if delta:
                pending[key] = pending.get(key, 0) + delta
        if cost_delta:
            for key in admission.budget_keys:
                pending[key] = pending.get(key, 0) + cost_delta
        if pending and (self._corrector is None or self._corrector.done()):
            self._corrector = asyncio.get_running_loop().create_task(self._correct_soon())

    async def _correct_soon(self) -> None:
        await asyncio.sleep(_CORRECTION_DELAY)
        await self._send_corrections()

    def _take_corrections(self) -> tuple[list[str], list[int]]:
        pending, self._corrections = self._corrections, {}
        keys = [key for key, delta in pending.items() if delta]
        return keys, [pending[key] for key in keys]

    async def _send_corrections(self) -> None:
        """Send the queued corrections on their own, as a round of the admission pipeline: an
        admission arriving meanwhile waits for it, so it counts them whichever connection of
        the client it gets."""
        while self._corrections:
            if self._in_flight:
                # The round under way, or the next, carries them; or this loop does, after it.
                await asyncio.sleep(_CORRECTION_DELAY)
                continue
            self._in_flight = True
            try:
                keys, deltas = self._take_corrections()
                if keys:
                    async with asyncio.timeout(self._options.redis_timeout):
                        await self._adjust_script(keys=keys, args=deltas)
            except (RedisError, TimeoutError):
                # The calls already happened; their records still count once batches are written.
                log.warning("could not correct rate-limit and budget counters", exc_info=True)
            finally:
                self._in_flight = False
                self._send_waiting()

    async def flush_corrections(self) -> None:
        """Send the queued counter corrections now, and wait for any being sent (shutdown)."""
        await self._send_corrections()
        if self._corrector is not None and not self._corrector.done():
            await asyncio.shield(self._corrector)

    async def _log_bodies(self) -> bool:
        if self.config is not None:
            try:
                value = await self.config("logging.log_request_bodies")
            except Exception:
                log.warning("app configuration unavailable; bodies are not logged", exc_info=True)
                return False
            if value is not None:
                return bool(value)
        return self._options.log_bodies

    @asynccontextmanager
    async def metered(
        self,
        principal: _Principal,
        model: Model | str,
        estimated_input_tokens: int,
        max_output_tokens: int | None,
        **outcome: Any,
    ) -> AsyncIterator[MeteredCall]:
        """`admit`, then `settle` with what the block reported through `call.done(...)`.

        A block that fails with an upstream error settles it as an error; one that fails
        before any upstream call (bad input, unknown model) or is cancelled releases the
        reservations. `outcome` holds fields common to both (operation id, usage type...).
        """
        admission = await self.admit(principal, model, estimated_input_tokens, max_output_tokens)
        call = MeteredCall(admission, outcome)
        try:
            yield call
        except BaseException as exc:
            await self.fail(admission, exc, **outcome)
            raise
        if call.outcome is None:
            await self.release(admission)
        else:
            await self.settle(admission, call.outcome)

    async def fail(self, admission: Admission, exc: BaseException, **outcome: Any) -> None:
        """End an admitted call that raised: an upstream error is recorded, anything else
        (bad input, unknown model, cancellation) made no upstream call and is released."""
        if isinstance(exc, DomainError) and not isinstance(exc, _NO_CALL_MADE):
            error = f"{exc.code}: {exc.message}"
            await self.settle(
                admission, UsageOutcome(status=UsageStatus.ERROR, error=error, **outcome)
            )
        else:
            await self.release(admission)

    async def stream(
        self,
        admission: Admission,
        chunks: AsyncIterator[T],
        usage: Callable[[], dict[str, Any] | None],
        **outcome: Any,
    ) -> AsyncIterator[T]:
        """Relay `chunks`, then settle with `usage()` (the stream's OpenAI usage object).

        A stream cut short (client gone, upstream failure) still counts what it used.
        """
        status = UsageStatus.SUCCESS
        error: str | None = None
        try:
            async for chunk in chunks:
                yield chunk
        except BaseException as exc:
            if not usage():
                await self.fail(admission, exc, **outcome)
                raise
            status, error = UsageStatus.ERROR, f"stream interrupted: {type(exc).__name__}"
            raise
        finally:
            if not admission.finished:
                used = usage() or {}
                await self.settle(
                    admission,
                    UsageOutcome(
                        status=status,
                        error=error,
                        input_tokens=int(used.get("prompt_tokens") or 0),
                        output_tokens=int(used.get("completion_tokens") or 0),
                        **outcome,
                    ),
                )

    async def close(self) -> None:
        """Send the queued counter corrections, and the buffered records and logs (graceful
        shutdown)."""
        await self.flush_corrections()
        await self.buffer.close()
        if self._owns_redis:
            await self._redis.aclose()


# Errors raised before any upstream call: nothing was spent.
_NO_CALL_MADE = (InvalidInput, NotFound, PermissionDenied, RateLimited, BudgetExceeded)


class MeteredCall:
    """The call inside `Metering.metered`: its rate-limit headers, and how it ended."""

    def __init__(self, admission: Admission, common: dict[str, Any]) -> None:
        self.admission = admission
        self.outcome: UsageOutcome | None = None
        self._common = common

    @property
    def headers(self) -> dict[str, str]:
        return self.admission.headers

    def done(self, **outcome: Any) -> None:
        """Record how the call ended (`UsageOutcome` fields); settled when the block exits."""
        self.outcome = UsageOutcome(**{**self._common, **outcome})

    def done_with_usage(self, usage: dict[str, Any] | None, **outcome: Any) -> None:
        """`done` from an OpenAI `usage` object (`prompt_tokens`, `completion_tokens`)."""
        usage = usage or {}
        self.done(
            input_tokens=int(usage.get("prompt_tokens") or 0),
            output_tokens=int(usage.get("completion_tokens") or 0),
            **outcome,
        )


def _jsonable(body: Any) -> Any:
    """A body as JSON values; a request model is dumped only when its body is logged."""
    dump = getattr(body, "model_dump", None)
    return dump(mode="json", exclude_none=True, by_alias=True) if callable(dump) else body


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

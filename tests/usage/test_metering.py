"""Rate limits, budget reservations and usage recording through the metering facade."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest
import redis.asyncio as aioredis

from app.access.entities import ApiKey
from app.core.errors import BudgetExceeded, InvalidInput, RateLimited, UpstreamUnavailable
from app.credentials.entities import Provider
from app.models.entities import Model
from app.storage.protocol import Storage
from app.usage.admission import Admission, Caller, output_reservation
from app.usage.entities import BudgetPeriod, BudgetScope, UsageRecord, UsageStatus
from app.usage.pricing import cost_micros
from app.usage.settlement import UsageOutcome
from app.usage.wiring import Accounting, build_accounting
from tests.factories import create
from tests.usage.conftest import Principal, RecordingSink, accounting_settings, redis_client


async def set_limits(storage: Storage, key_id: str, limits: dict[str, int]) -> None:

    async with storage.unit_of_work() as uow:
        await create(uow, ApiKey, id=key_id, team_id=None, rate_limits=limits)
        await uow.commit()


async def all_records(storage: Storage) -> list[UsageRecord]:
    async with storage.unit_of_work() as uow:
        return (await uow.repo(UsageRecord).find(order_by=["created_at"])).items


def test_cost_is_rounded_up_to_whole_micro_dollars() -> None:
    # 1000 tokens at $2/M = 2000 µ$, 500 at $10/M = 5000 µ$; one token at $0.15/M is 0.15 µ$ → 1.
    assert cost_micros(Decimal("2"), Decimal("10"), 1000, 500) == 7000
    assert cost_micros(Decimal("0.15"), Decimal("0"), 1, 0) == 1
    assert cost_micros(Decimal("0"), Decimal("0"), 10**6, 10**6) == 0


@pytest.mark.parametrize(
    ("input_price", "output_price", "input_tokens", "output_tokens"),
    [
        ("0.000001", "0.000003", 1, 1),
        ("1.23456789", "98.7654321", 123_457, 9_876),
        ("0.15", "0.6", 7, 333),
        ("30", "60", 10**9, 10**9),
        ("0.0000000001", "0", 3, 0),
        ("12.5", "0.3333333333", 0, 3),
    ],
)
def test_cost_is_exactly_the_decimal_cost_rounded_up(
    input_price: str, output_price: str, input_tokens: int, output_tokens: int
) -> None:
    exact = Decimal(input_tokens) * Decimal(input_price) + Decimal(output_tokens) * Decimal(
        output_price
    )
    expected = int(exact.to_integral_value(rounding="ROUND_CEILING"))
    cost = cost_micros(Decimal(input_price), Decimal(output_price), input_tokens, output_tokens)
    assert cost == expected


async def test_a_settled_call_is_recorded_with_its_cost_from_the_model_prices(
    accounting: Accounting, model: Model, storage: Storage
) -> None:
    admission = await accounting.metering.admit(Principal("key-a", "team-a"), model, 10, 100)
    await accounting.metering.settle(
        admission, UsageOutcome(input_tokens=1000, output_tokens=500, operation_id="op-1")
    )
    (record,) = await all_records(storage)
    assert (record.api_key_id, record.team_id, record.model_id) == ("key-a", "team-a", "priced")
    assert (record.input_tokens, record.output_tokens, record.cost_micros) == (1000, 500, 7000)
    assert record.status is UsageStatus.SUCCESS and record.operation_id == "op-1"
    assert record.provider == "mock" and not record.cache_hit


async def test_a_cache_hit_costs_nothing(
    accounting: Accounting, model: Model, storage: Storage
) -> None:
    admission = await accounting.metering.admit(Principal("key-a"), model, 10, 10)
    await accounting.metering.settle(
        admission, UsageOutcome(input_tokens=10, output_tokens=10, cache_hit=True)
    )
    (record,) = await all_records(storage)
    assert record.cache_hit and record.cost_micros == 0


async def test_requests_past_the_per_minute_limit_are_refused_with_headers(
    accounting: Accounting, model: Model, storage: Storage
) -> None:
    await set_limits(storage, "key-rl", {"requests_per_minute": 3})
    principal = Principal("key-rl")
    seen = []
    for _ in range(3):
        admission = await accounting.metering.admit(principal, model, 1, 1)
        seen.append(admission.headers["x-ratelimit-remaining-requests"])
        await accounting.metering.settle(admission, UsageOutcome(input_tokens=1))
    assert seen == ["2", "1", "0"]
    assert admission.headers["x-ratelimit-limit-requests"] == "3"
    with pytest.raises(RateLimited) as refused:
        await accounting.metering.admit(principal, model, 1, 1)
    assert 0 < refused.value.retry_after <= 60
    assert refused.value.details["headers"]["x-ratelimit-remaining-requests"] == "0"


async def test_a_team_limit_is_shared_by_the_keys_of_the_team(
    accounting: Accounting, model: Model, storage: Storage
) -> None:
    from app.access.entities import Team

    async with storage.unit_of_work() as uow:
        await uow.repo(Team).add(Team(id="team-rl", name="t", rate_limits={"rpm": 2}))
        await uow.commit()
    await accounting.metering.admit(Principal("key-1", "team-rl"), model, 1, 1)
    await accounting.metering.admit(Principal("key-2", "team-rl"), model, 1, 1)
    with pytest.raises(RateLimited):
        await accounting.metering.admit(Principal("key-3", "team-rl"), model, 1, 1)


async def test_token_reservations_are_corrected_by_the_real_count(
    accounting: Accounting, model: Model, storage: Storage
) -> None:
    await set_limits(storage, "key-tpm", {"tokens_per_minute": 1000})
    principal = Principal("key-tpm")
    first = await accounting.metering.admit(principal, model, 100, 500)  # reserves 600
    assert first.headers["x-ratelimit-remaining-tokens"] == "400"
    with pytest.raises(RateLimited):
        await accounting.metering.admit(principal, model, 100, 500)
    await accounting.metering.settle(first, UsageOutcome(input_tokens=100, output_tokens=50))
    second = await accounting.metering.admit(principal, model, 100, 500)
    assert second.headers["x-ratelimit-remaining-tokens"] == str(1000 - 150 - 600)


async def test_release_gives_every_reservation_back(
    accounting: Accounting, model: Model, storage: Storage
) -> None:
    await set_limits(storage, "key-rel", {"requests_per_minute": 1, "tokens_per_minute": 100})
    budget = await accounting.budgets.create(
        name="b",
        scope=BudgetScope.KEY,
        scope_id="key-rel",
        period=BudgetPeriod.DAILY,
        hard_limit_micros=1000,
    )
    principal = Principal("key-rel")
    admission = await accounting.metering.admit(principal, model, 50, 50)  # costs up to 600
    await accounting.metering.release(admission)
    await accounting.metering.release(admission)  # a second release changes nothing
    again = await accounting.metering.admit(principal, model, 50, 50)
    assert again.headers["x-ratelimit-remaining-requests"] == "0"
    assert again.reserved_cost_micros == 600
    assert budget.id in again.budget_keys[0]


async def test_a_hard_budget_refuses_calls_that_could_cross_it(
    accounting: Accounting, model: Model
) -> None:
    await accounting.budgets.create(
        name="team cap",
        scope=BudgetScope.TEAM,
        scope_id="team-b",
        period=BudgetPeriod.MONTHLY,
        hard_limit_micros=1000,
    )
    # 100 output tokens at $10/M: 1000 µ$ at most — exactly the limit, then nothing more.
    first = await accounting.metering.admit(Principal("key-1", "team-b"), model, 0, 100)
    with pytest.raises(BudgetExceeded) as refused:
        await accounting.metering.admit(Principal("key-2", "team-b"), model, 0, 1)
    assert refused.value.code == "budget_exceeded"
    # Other teams are not affected.
    await accounting.metering.admit(Principal("key-3", "team-c"), model, 0, 100)
    await accounting.metering.settle(first, UsageOutcome(output_tokens=40))
    await accounting.metering.admit(Principal("key-2", "team-b"), model, 0, 60)


async def test_200_concurrent_calls_against_a_budget_for_50_spend_at_most_the_limit(
    accounting: Accounting, model: Model, storage: Storage
) -> None:
    per_call = cost_micros(Decimal("2"), Decimal("10"), 100, 100)  # 1200 µ$
    budget = await accounting.budgets.create(
        name="global",
        scope=BudgetScope.GLOBAL,
        scope_id=None,
        period=BudgetPeriod.DAILY,
        hard_limit_micros=50 * per_call,
    )
    metering = accounting.metering

    async def call(n: int) -> str:
        try:
            admission = await metering.admit(Principal(f"key-{n % 7}"), model, 100, 100)
        except BudgetExceeded as exc:
            return exc.code
        await asyncio.sleep(0.01)  # the upstream call: others are admitted meanwhile
        await metering.settle(admission, UsageOutcome(input_tokens=100, output_tokens=100))
        return "ok"

    results = await asyncio.gather(*(call(n) for n in range(200)))
    assert results.count("ok") == 50
    assert set(results) == {"ok", "budget_exceeded"}
    spent = sum(r.cost_micros for r in await all_records(storage))
    assert spent <= budget.hard_limit_micros + per_call
    assert (await accounting.budgets.get(budget.id)).current_usage_micros == spent


async def test_a_lost_budget_counter_is_rebuilt_from_the_recorded_spend(
    accounting: Accounting, model: Model, redis: aioredis.Redis
) -> None:
    budget = await accounting.budgets.create(
        name="b",
        scope=BudgetScope.GLOBAL,
        scope_id=None,
        period=BudgetPeriod.MONTHLY,
        hard_limit_micros=2000,
    )
    admission = await accounting.metering.admit(Principal("k"), model, 0, 150)
    await accounting.metering.settle(admission, UsageOutcome(output_tokens=150))  # 1500
    await redis.flushdb()  # Redis restarted empty
    with pytest.raises(BudgetExceeded):
        await accounting.metering.admit(Principal("k"), model, 0, 60)  # 1500 + 600 > 2000
    assert (await accounting.budgets.get(budget.id)).current_usage_micros == 1500


async def test_two_processes_sharing_redis_hold_one_rate_limit(
    storage: Storage, redis_url: str, redis: aioredis.Redis, model: Model, sink: RecordingSink
) -> None:
    await set_limits(storage, "key-shared", {"requests_per_minute": 10})
    clients = [redis_client(redis_url) for _ in range(2)]
    processes = [
        build_accounting(accounting_settings(), storage, client, sink) for client in clients
    ]

    async def call(n: int) -> bool:
        try:
            await processes[n % 2].metering.admit(Principal("key-shared"), model, 1, 1)
        except RateLimited:
            return False
        return True

    results = await asyncio.gather(*(call(n) for n in range(40)))
    assert sum(results) == 10
    for process, client in zip(processes, clients, strict=True):
        await process.metering.close()
        await client.aclose()


async def test_metered_records_an_upstream_failure_and_releases_a_refused_request(
    accounting: Accounting, model: Model, storage: Storage
) -> None:
    await set_limits(storage, "key-m", {"requests_per_minute": 1})
    principal = Principal("key-m")
    with pytest.raises(InvalidInput):
        async with accounting.metering.metered(principal, model.id, 5, 5):
            raise InvalidInput("bad", param="messages")  # before any upstream call
    with pytest.raises(UpstreamUnavailable):
        async with accounting.metering.metered(principal, model.id, 5, 5, operation_id="op-9"):
            raise UpstreamUnavailable("upstream 503")
    (record,) = await all_records(storage)
    assert record.status is UsageStatus.ERROR and record.operation_id == "op-9"
    assert record.error is not None and "upstream 503" in record.error
    with pytest.raises(RateLimited):  # the failed call counted, the refused one did not
        await accounting.metering.admit(principal, model, 1, 1)


async def test_a_fallback_model_is_charged_at_its_own_price(
    accounting: Accounting, model: Model, storage: Storage
) -> None:
    cheap = Model(id="cheap", name="Cheap", provider=Provider.MOCK, provider_model="mock")
    async with storage.unit_of_work() as uow:
        await uow.repo(Model).add(cheap)
        await uow.commit()
    async with accounting.metering.metered(Caller(None, None), model.id, 10, 10) as call:
        call.done(input_tokens=1000, output_tokens=1000, model_id="cheap")
    (record,) = await all_records(storage)
    assert record.model_id == "cheap" and record.cost_micros == 0


# --- what a call without max_tokens reserves ---------------------------------------------------

# A model with a 128k context window, at $2/M input and $10/M output.
WINDOWED = Model(
    id="windowed",
    name="Windowed",
    provider=Provider.MOCK,
    provider_model="mock",
    context_window=128_000,
    input_price_per_million=Decimal("2"),
    output_price_per_million=Decimal("10"),
)


@pytest.fixture
async def windowed(storage: Storage) -> Model:
    async with storage.unit_of_work() as uow:
        added = await uow.repo(Model).add(WINDOWED.model_copy())
        await uow.commit()
    return added


async def counter_value(redis: aioredis.Redis, key: str) -> int:
    return int(await redis.get(key) or 0)


def tokens_key(admission: Admission) -> str:
    return next(key for key, dimension in admission.rate_keys if dimension == "tokens")


@pytest.mark.parametrize(
    ("context_window", "parameters", "prompt", "max_tokens", "expected"),
    [
        (None, {}, 10, None, (4096, 0)),  # the default allowance, none of it firm
        (128_000, {}, 10, None, (4096, 0)),
        (1000, {}, 900, None, (100, 0)),  # what the window leaves after the input
        (1000, {}, 1200, None, (0, 0)),
        (None, {"max_tokens": 300}, 10, None, (300, 0)),  # the model's own cap
        (None, {"max_tokens": 9000}, 10, None, (4096, 0)),
        (None, {}, 10, 50, (50, 50)),  # the client's cap, all of it firm
        (None, {}, 10, 9000, (9000, 9000)),
        (1000, {}, 900, 500, (100, 100)),
        (None, {"max_tokens": 300}, 10, 500, (500, 500)),
    ],
)
def test_the_output_reservation_is_the_clients_cap_or_a_bounded_allowance(
    context_window: int | None,
    parameters: dict[str, int],
    prompt: int,
    max_tokens: int | None,
    expected: tuple[int, int],
) -> None:
    model = WINDOWED.model_copy(update={"context_window": context_window, "parameters": parameters})
    assert output_reservation(model, prompt, max_tokens, 4096) == expected


async def test_a_limit_below_the_output_allowance_admits_a_call_without_max_tokens(
    accounting: Accounting, windowed: Model, storage: Storage, redis: aioredis.Redis
) -> None:
    await set_limits(storage, "key-small", {"tokens_per_minute": 1000})
    principal = Principal("key-small")
    metering = accounting.metering
    first = await metering.admit(principal, windowed, 12, None)
    assert first.reserved_tokens == 12 + 4096
    # While its allowance is reserved, the window is full for the next call.
    with pytest.raises(RateLimited, match="rate limit reached"):
        await metering.admit(principal, windowed, 12, None)
    await metering.settle(first, UsageOutcome(input_tokens=10, output_tokens=30))
    await metering.flush_corrections()
    assert await counter_value(redis, tokens_key(first)) == 40  # the real usage
    second = await metering.admit(principal, windowed, 12, None)
    await metering.settle(second, UsageOutcome(input_tokens=10, output_tokens=25))
    await metering.flush_corrections()
    assert await counter_value(redis, tokens_key(second)) == 40 + 35


async def test_a_call_whose_input_alone_exceeds_the_limit_is_refused_naming_the_limit(
    accounting: Accounting, windowed: Model, storage: Storage, redis: aioredis.Redis
) -> None:
    await set_limits(storage, "key-tiny", {"tokens_per_minute": 1000})
    principal = Principal("key-tiny")
    with pytest.raises(RateLimited) as refused:
        await accounting.metering.admit(principal, windowed, 1001, None)
    message = refused.value.message
    assert "tokens_per_minute" in message and "1000" in message and "1001" in message
    assert "shorten the input" in message and "max_tokens" not in message
    with pytest.raises(RateLimited) as capped:
        await accounting.metering.admit(principal, windowed, 100, 901)
    assert "lower max_tokens" in capped.value.message
    # Neither refusal counted anything.
    assert await redis.keys("gateway:rl:key:key-tiny:tokens:*") == []


async def test_the_clients_max_tokens_caps_the_reservation(
    accounting: Accounting, windowed: Model, storage: Storage, redis: aioredis.Redis
) -> None:
    await set_limits(storage, "key-cap", {"tokens_per_minute": 1000})
    admission = await accounting.metering.admit(Principal("key-cap"), windowed, 20, 100)
    assert admission.reserved_tokens == 120
    assert admission.reserved_cost_micros == cost_micros(Decimal("2"), Decimal("10"), 20, 100)
    assert await counter_value(redis, tokens_key(admission)) == 120
    assert admission.headers["x-ratelimit-remaining-tokens"] == "880"


async def test_a_budget_smaller_than_the_allowance_admits_a_call_without_max_tokens(
    accounting: Accounting, windowed: Model, redis: aioredis.Redis
) -> None:
    # 4096 output tokens at $10/M may cost 40960 µ$: far more than this budget holds.
    await accounting.budgets.create(
        name="small",
        scope=BudgetScope.KEY,
        scope_id="key-b",
        period=BudgetPeriod.DAILY,
        hard_limit_micros=1000,
    )
    metering = accounting.metering
    admission = await metering.admit(Principal("key-b"), windowed, 100, None)
    assert admission.reserved_cost_micros == cost_micros(Decimal("2"), Decimal("10"), 100, 4096)
    await metering.settle(admission, UsageOutcome(input_tokens=100, output_tokens=30))
    await metering.flush_corrections()
    (budget_key,) = admission.budget_keys
    assert await counter_value(redis, budget_key) == 100 * 2 + 30 * 10  # the real cost
    # An input whose own cost does not fit is refused, naming what it may cost.
    with pytest.raises(BudgetExceeded, match="may cost up to 1000"):
        await metering.admit(Principal("key-b"), windowed, 500, None)
    # A client's max_tokens must fit in full.
    with pytest.raises(BudgetExceeded):
        await metering.admit(Principal("key-b"), windowed, 10, 60)
    await metering.admit(Principal("key-b"), windowed, 10, 40)

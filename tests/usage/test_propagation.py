"""Budgets, rate limits and prices changed through the admin API apply in every process at once.

Metering caches what admission reads for `METERING_CACHE_SECONDS`; these tests set it to a
minute, so only the invalidation message (not the cache's expiry) can make the change apply.
Two API apps on one PostgreSQL and one Redis stand for two processes; the delay until the
other process applies a change is measured and printed (`pytest -rP` shows it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from app.core.errors import RateLimited
from app.core.invalidation import METERING_TOPIC
from app.storage.protocol import Storage
from app.storage.sql import SqlStorage, make_database
from app.usage.admission import Caller
from app.usage.metering import Metering
from tests.conftest import truncate_all
from tests.usage.test_api import ADMIN, app_on, serve, services_of
from tests.usage.test_chat_metering import CALL, PRICED, add_priced_model, new_key

CACHE_SECONDS = 60
# The bound on how long after the admin call returns the other process may still admit.
PROPAGATION_BOUND = 0.1
RecordProperty = Callable[[str, object], None]


def settings_for(database_url: str, redis_url: str) -> dict[str, Any]:
    return {
        "STORAGE_BACKEND": "postgres",
        "PROCESS_ROLE": "api",
        "BROKER": "redis",
        "REDIS_URL": redis_url,
        "DATABASE_URL": database_url,
        "SECRET_KEY": "propagation-tests-secret-key-0123456789",
        "METERING_CACHE_SECONDS": CACHE_SECONDS,
    }


@pytest.fixture
async def two_apis(
    database_url: str, redis_url: str, redis: aioredis.Redis
) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    """Two API apps, each with its own connection pool, Redis clients and listener."""
    truncate_all(database_url)
    async with AsyncExitStack() as stack:
        clients = []
        for _ in range(2):
            storage = SqlStorage(make_database(database_url, pool_size=8, max_overflow=0))
            stack.push_async_callback(storage.close)
            app = app_on(storage, **settings_for(database_url, redis_url))
            client = await stack.enter_async_context(serve(app))
            await until(lambda c=client: services_of(c).invalidation.subscribed, within=3.0)  # type: ignore[misc]
            clients.append(client)
        await add_priced_model(services_of(clients[0]).storage)
        yield clients[0], clients[1]


async def until(check: Callable[[], bool], *, within: float) -> float:
    """Seconds until `check()` holds, polled every millisecond; fails the test after `within`."""
    started = time.monotonic()
    while not check():
        elapsed = time.monotonic() - started
        assert elapsed < within, f"not true within {within * 1000:.0f} ms"
        await asyncio.sleep(0.001)
    return time.monotonic() - started


def report(record_property: RecordProperty, name: str, delay: float) -> None:
    record_property(f"{name}_propagation_ms", round(delay * 1000, 2))
    print(f"{name}: the other process applied the change {delay * 1000:.1f} ms after the call")


async def chat(client: httpx.AsyncClient, key: dict[str, str], n: int) -> list[int]:
    calls = [client.post("/v1/chat/completions", json=CALL, headers=key) for _ in range(n)]
    return [r.status_code for r in await asyncio.gather(*calls)]


def metering_of(client: httpx.AsyncClient) -> Metering:
    return services_of(client).metering


@pytest.mark.postgres
@pytest.mark.redis
async def test_a_budget_created_on_one_api_is_enforced_by_the_other_at_once(
    two_apis: tuple[httpx.AsyncClient, httpx.AsyncClient], record_property: RecordProperty
) -> None:
    first, second = two_apis
    key = await new_key(first)
    # Both processes have served the key, so both cache "no budget applies".
    assert await chat(first, key, 1) == [200] and await chat(second, key, 1) == [200]
    budgets = metering_of(second)._admission._enabled_budgets
    assert budgets.get("enabled") == []

    created = await first.post(
        "/admin/budgets",
        json={"name": "fifty calls", "period": "daily", "hard_limit_micros": 50 * 100},
        headers=ADMIN,
    )
    assert created.status_code == 201, created.text
    delay = await until(lambda: budgets.get("enabled") is None, within=PROPAGATION_BOUND)
    report(record_property, "budget created", delay)

    statuses = await asyncio.gather(chat(first, key, 100), chat(second, key, 100))
    both = statuses[0] + statuses[1]
    assert both.count(200) == 50 and both.count(402) == 150

    # Raising the limit through the other process lifts the block in the first one.
    raised = await second.patch(
        f"/admin/budgets/{created.json()['id']}",
        json={"hard_limit_micros": 60 * 100},
        headers=ADMIN,
    )
    assert raised.status_code == 200, raised.text
    delay = await until(
        lambda: metering_of(first)._admission._enabled_budgets.get("enabled") is None,
        within=PROPAGATION_BOUND,
    )
    report(record_property, "budget raised", delay)
    assert (await chat(first, key, 20)).count(200) == 10

    deleted = await second.delete(f"/admin/budgets/{created.json()['id']}", headers=ADMIN)
    assert deleted.status_code == 200
    delay = await until(
        lambda: metering_of(first)._admission._enabled_budgets.get("enabled") is None,
        within=PROPAGATION_BOUND,
    )
    report(record_property, "budget deleted", delay)
    assert await chat(first, key, 3) == [200] * 3


@pytest.mark.postgres
@pytest.mark.redis
async def test_a_key_limit_lowered_on_one_api_holds_on_the_other_at_once(
    two_apis: tuple[httpx.AsyncClient, httpx.AsyncClient], record_property: RecordProperty
) -> None:
    first, second = two_apis
    created = await first.post(
        "/admin/keys",
        json={"name": "client", "rate_limits": {"requests_per_day": 1000}},
        headers=ADMIN,
    )
    key_id, secret = created.json()["id"], created.json()["key"]
    key = {"Authorization": f"Bearer {secret}"}
    assert await chat(first, key, 1) == [200] and await chat(second, key, 1) == [200]
    # A job run by the second process reads the key's limits by id: cached there too.
    job = Caller(key_id=key_id, team_id=None)
    await metering_of(second).release(await metering_of(second).admit(job, PRICED.id, 1, 10))
    job_limits = metering_of(second)._admission._key_limits
    assert job_limits.get(key_id) is not None

    changed = await first.patch(
        f"/admin/keys/{key_id}", json={"rate_limits": {"requests_per_day": 5}}, headers=ADMIN
    )
    assert changed.status_code == 200, changed.text
    delay = await until(lambda: job_limits.get(key_id) is None, within=PROPAGATION_BOUND)
    report(record_property, "key limit lowered", delay)

    # Two calls were counted today; the second process admits three more of ten.
    statuses = await chat(second, key, 10)
    assert statuses.count(200) == 3 and statuses.count(429) == 7
    with pytest.raises(RateLimited, match="rate limit reached: 5 requests per day"):
        await metering_of(second).admit(job, PRICED.id, 1, 10)


@pytest.mark.postgres
@pytest.mark.redis
async def test_a_team_limit_lowered_on_one_api_holds_on_the_other_at_once(
    two_apis: tuple[httpx.AsyncClient, httpx.AsyncClient], record_property: RecordProperty
) -> None:
    first, second = two_apis
    team = await first.post(
        "/admin/teams",
        json={"name": "research", "rate_limits": {"requests_per_day": 1000}},
        headers=ADMIN,
    )
    assert team.status_code == 201, team.text
    team_id = team.json()["id"]
    key = await new_key(first, team_id=team_id)
    assert await chat(first, key, 1) == [200] and await chat(second, key, 1) == [200]
    team_limits = metering_of(second)._admission._team_limits
    assert team_limits.get(team_id) is not None

    changed = await first.patch(
        f"/admin/teams/{team_id}", json={"rate_limits": {"requests_per_day": 5}}, headers=ADMIN
    )
    assert changed.status_code == 200, changed.text
    delay = await until(lambda: team_limits.get(team_id) is None, within=PROPAGATION_BOUND)
    report(record_property, "team limit lowered", delay)

    statuses = await chat(second, key, 10)
    assert statuses.count(200) == 3 and statuses.count(429) == 7


@pytest.mark.postgres
@pytest.mark.redis
async def test_a_price_changed_on_one_api_is_charged_by_the_other_at_once(
    two_apis: tuple[httpx.AsyncClient, httpx.AsyncClient], record_property: RecordProperty
) -> None:
    first, second = two_apis
    key = await new_key(first)
    assert await chat(second, key, 1) == [200]
    models = metering_of(second)._admission._models
    assert models.get(PRICED.id) is not None

    changed = await first.patch(
        f"/admin/models/{PRICED.id}", json={"output_price_per_million": "20"}, headers=ADMIN
    )
    assert changed.status_code == 200, changed.text
    delay = await until(lambda: models.get(PRICED.id) is None, within=PROPAGATION_BOUND)
    report(record_property, "price changed", delay)

    # Ten output tokens now cost 200 micro-dollars: a budget for one call admits one.
    budget = {"name": "one call", "period": "daily", "hard_limit_micros": 200}
    assert (await first.post("/admin/budgets", json=budget, headers=ADMIN)).status_code == 201
    await until(
        lambda: metering_of(second)._admission._enabled_budgets.get("enabled") is None,
        within=PROPAGATION_BOUND,
    )
    assert sorted(await chat(second, key, 3)) == [200, 402, 402]


# -- one process (memory storage or PostgreSQL, the in-process Redis stand-in) ------------------


@pytest.fixture
async def one_api(storage: Storage) -> AsyncIterator[httpx.AsyncClient]:
    await add_priced_model(storage)
    async with serve(app_on(storage, METERING_CACHE_SECONDS=CACHE_SECONDS)) as client:
        yield client


async def test_in_one_process_a_new_budget_refuses_the_very_next_call(
    one_api: httpx.AsyncClient,
) -> None:
    key = await new_key(one_api)
    assert await chat(one_api, key, 1) == [200]
    budget = {"name": "two calls", "period": "daily", "hard_limit_micros": 2 * 100}
    created = await one_api.post("/admin/budgets", json=budget, headers=ADMIN)
    assert created.status_code == 201
    assert sorted(await chat(one_api, key, 3)) == [200, 200, 402]
    disabled = await one_api.patch(
        f"/admin/budgets/{created.json()['id']}", json={"enabled": False}, headers=ADMIN
    )
    assert disabled.status_code == 200
    assert await chat(one_api, key, 2) == [200, 200]


async def test_in_one_process_lowered_team_and_key_limits_hold_for_the_very_next_call(
    one_api: httpx.AsyncClient,
) -> None:
    team = await one_api.post(
        "/admin/teams",
        json={"name": "research", "rate_limits": {"requests_per_day": 1000}},
        headers=ADMIN,
    )
    team_id = team.json()["id"]
    created = await one_api.post(
        "/admin/keys",
        json={"name": "client", "team_id": team_id, "rate_limits": {"requests_per_day": 1000}},
        headers=ADMIN,
    )
    key_id, key = created.json()["id"], {"Authorization": f"Bearer {created.json()['key']}"}
    assert await chat(one_api, key, 1) == [200]

    lowered = await one_api.patch(
        f"/admin/teams/{team_id}", json={"rate_limits": {"requests_per_day": 2}}, headers=ADMIN
    )
    assert lowered.status_code == 200
    assert await chat(one_api, key, 2) == [200, 429]

    await one_api.patch(
        f"/admin/teams/{team_id}", json={"rate_limits": {"requests_per_day": 100}}, headers=ADMIN
    )
    assert await chat(one_api, key, 1) == [200]  # the team's limit is raised: 3 of 100
    # A job for the key (its limits read by id) meets the key's lowered limit at once.
    metering = services_of(one_api).metering
    job = Caller(key_id=key_id, team_id=team_id)
    await metering.release(await metering.admit(job, PRICED.id, 1, 10))
    await one_api.patch(
        f"/admin/keys/{key_id}", json={"rate_limits": {"requests_per_day": 3}}, headers=ADMIN
    )
    with pytest.raises(RateLimited, match="rate limit reached: 3 requests per day"):
        await metering.admit(job, PRICED.id, 1, 10)
    assert await chat(one_api, key, 1) == [429]


async def test_in_one_process_a_price_change_is_charged_on_the_very_next_call(
    one_api: httpx.AsyncClient,
) -> None:
    key = await new_key(one_api)
    assert await chat(one_api, key, 1) == [200]
    changed = await one_api.patch(
        f"/admin/models/{PRICED.id}", json={"output_price_per_million": "30"}, headers=ADMIN
    )
    assert changed.status_code == 200, changed.text
    budget = {"name": "one call", "period": "daily", "hard_limit_micros": 300}
    assert (await one_api.post("/admin/budgets", json=budget, headers=ADMIN)).status_code == 201
    assert sorted(await chat(one_api, key, 2)) == [200, 402]


async def test_a_lost_subscription_drops_every_cached_limit_budget_and_price(
    one_api: httpx.AsyncClient,
) -> None:
    key = await new_key(one_api, rate_limits={"requests_per_day": 1000})
    assert await chat(one_api, key, 1) == [200]
    metering = services_of(one_api).metering

    def cached() -> list[object]:
        return [
            metering._admission._enabled_budgets.get("enabled"),
            metering._admission._models.get(PRICED.id),
            metering._admission._default_limits.get("defaults"),
        ]

    assert None not in cached()
    # What the channel does when it (re)subscribes: anything may have changed meanwhile.
    services_of(one_api).invalidation._dispatch_everything()
    assert cached() == [None, None, None]


async def test_an_unknown_metering_item_drops_everything_rather_than_nothing(
    one_api: httpx.AsyncClient,
) -> None:
    key = await new_key(one_api)
    assert await chat(one_api, key, 1) == [200]
    metering = services_of(one_api).metering
    await services_of(one_api).invalidation.publish(METERING_TOPIC, "quota:q-1")
    assert metering._admission._enabled_budgets.get("enabled") is None
    assert metering._admission._models.get(PRICED.id) is None

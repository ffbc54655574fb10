"""Sign-in throttling on the in-process Redis stand-in and on the real Redis server."""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from fastapi import FastAPI
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

import app.access.users as users_module
from app.access.throttle import LoginThrottle, ThrottleLimits
from app.config import Settings
from app.main import create_app
from app.storage.protocol import Storage
from tests.access.conftest import ADMIN, settings
from tests.fakes import RecordingQueue

PASSWORD = "the right password"
WRONG = "a wrong password"

Serve = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


@asynccontextmanager
async def serve_from(app: FastAPI, address: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client of `app`, with its lifespan running, whose requests come from `address`."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=(address, 50000))
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield client


@pytest.fixture(params=["fakeredis", "redis"])
async def overrides(request: pytest.FixtureRequest) -> AsyncIterator[dict[str, Any]]:
    """Settings of an app whose counters live in the in-process stand-in or the real Redis."""
    from app.storage.memory import MemoryStorage
    from app.storage.sql import SqlStorage, make_database
    from tests.conftest import truncate_all

    if request.param == "fakeredis":
        yield {"storage": MemoryStorage()}
        return
    redis_url = request.getfixturevalue("redis_url")
    database_url = request.getfixturevalue("database_url")
    truncate_all(database_url)
    storage = SqlStorage(make_database(database_url, pool_size=20, max_overflow=20))
    yield {
        "storage": storage,
        "STORAGE_BACKEND": "postgres",
        "PROCESS_ROLE": "api",
        "BROKER": "redis",
        "REDIS_URL": redis_url,
        "DATABASE_URL": database_url,
        "SECRET_KEY": "access-tests-secret-key-0123456789",
    }
    await storage.close()


@pytest.fixture
def serve(overrides: dict[str, Any]) -> Serve:
    """Starts an app on the backend under test with these settings, for requests from an address."""

    def start(address: str, **values: Any) -> AbstractAsyncContextManager[httpx.AsyncClient]:
        options = dict(overrides)
        storage: Storage = options.pop("storage")
        app = create_app(
            settings(**options, **values), storage=storage, queue=RecordingQueue(storage)
        )
        return serve_from(app, address)

    return start


def new_address() -> str:
    """A client address of this test alone (the counters outlive a test in either Redis)."""
    return "10." + ".".join(str(b) for b in secrets.token_bytes(3))


@pytest.fixture
def address() -> str:
    return new_address()


@pytest.fixture
def username() -> str:
    return f"user-{secrets.token_hex(6)}"


async def add_user(client: httpx.AsyncClient, username: str) -> None:
    body = {"username": username, "password": PASSWORD}
    response = await client.post("/admin/users", json=body, headers=ADMIN)
    assert response.status_code == 201, response.text


async def sign_in(client: httpx.AsyncClient, username: str, password: str) -> httpx.Response:
    return await client.post("/auth/login", json={"username": username, "password": password})


def assert_throttled(response: httpx.Response) -> None:
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert error["code"] == "login_throttled" and error["type"] == "rate_limit_error"
    assert int(response.headers["retry-after"]) >= 1
    assert int(response.headers["retry-after-ms"]) > 0


async def test_parallel_wrong_passwords_past_the_budget_get_429_and_the_lock_holds_the_right_one(
    serve: Serve,
    address: str,
    username: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    verified: list[str] = []
    verify = users_module.verify_password

    async def counting_verify(password_hash: str, password: str) -> bool:
        verified.append(password)
        return await verify(password_hash, password)

    monkeypatch.setattr(users_module, "verify_password", counting_verify)
    async with serve(address, LOGIN_MAX_FAILURES=5, LOGIN_LOCK_SECONDS=1.5) as client:
        await add_user(client, username)
        with caplog.at_level(logging.WARNING, logger="app.access.throttle"):
            answers = await asyncio.gather(*(sign_in(client, username, WRONG) for _ in range(50)))
        statuses = [r.status_code for r in answers]
        assert statuses.count(401) == 5 and statuses.count(429) == 45
        for refused in (r for r in answers if r.status_code == 429):
            assert_throttled(refused)
        assert len(verified) == 5  # the refused attempts cost no password check

        locked = await sign_in(client, username, PASSWORD)
        assert_throttled(locked)
        await asyncio.sleep(int(locked.headers["retry-after-ms"]) / 1000 + 0.05)
        assert (await sign_in(client, username, PASSWORD)).status_code == 200

    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 1
    assert username in lines[0] and address in lines[0] and WRONG not in lines[0]


async def test_a_successful_sign_in_clears_the_accounts_failures(
    serve: Serve, address: str, username: str
) -> None:
    async with serve(address, LOGIN_MAX_FAILURES=5) as client:
        await add_user(client, username)
        for _ in range(4):
            assert (await sign_in(client, username, WRONG)).status_code == 401
        assert (await sign_in(client, username, PASSWORD)).status_code == 200
        for _ in range(5):
            assert (await sign_in(client, username, WRONG)).status_code == 401
        assert_throttled(await sign_in(client, username, WRONG))


async def test_failures_older_than_the_window_are_forgotten(
    serve: Serve, address: str, username: str
) -> None:
    async with serve(address, LOGIN_MAX_FAILURES=3, LOGIN_FAILURE_WINDOW_SECONDS=0.3) as client:
        for _ in range(3):
            assert (await sign_in(client, username, WRONG)).status_code == 401
        await asyncio.sleep(0.35)
        # Three failures remembered would make the next one over the limit: each is a plain 401.
        # (Not followed by a fourth: a slow host can let these fall out of the window as well.)
        for _ in range(3):
            assert (await sign_in(client, username, WRONG)).status_code == 401


async def test_each_new_lock_lasts_twice_as_long_up_to_the_longest(
    serve: Serve, address: str, username: str
) -> None:
    limits = {"LOGIN_MAX_FAILURES": 1, "LOGIN_LOCK_SECONDS": 0.2, "LOGIN_LOCK_MAX_SECONDS": 0.5}
    async with serve(address, **limits) as client:
        waits = []
        for _ in range(3):
            assert (await sign_in(client, username, WRONG)).status_code == 401
            locked = await sign_in(client, username, WRONG)
            assert_throttled(locked)
            waits.append(int(locked.headers["retry-after-ms"]))
            await asyncio.sleep(waits[-1] / 1000 + 0.05)
    assert 150 < waits[0] <= 200
    assert 350 < waits[1] <= 400
    assert 450 < waits[2] <= 500


async def test_an_address_is_throttled_across_usernames_and_other_addresses_are_not(
    serve: Serve, address: str, username: str
) -> None:
    limits = {"LOGIN_MAX_FAILURES": 5, "LOGIN_ADDRESS_MAX_FAILURES": 8}
    async with serve(address, **limits) as client:
        await add_user(client, username)
        for n in range(8):
            assert (await sign_in(client, f"{username}-{n}", WRONG)).status_code == 401
        assert_throttled(await sign_in(client, f"{username}-other", WRONG))
        assert_throttled(await sign_in(client, username, PASSWORD))
    async with serve(new_address(), **limits) as elsewhere:
        assert (await sign_in(elsewhere, username, PASSWORD)).status_code == 200


async def test_successful_sign_ins_do_not_use_up_the_addresss_budget(
    serve: Serve, address: str, username: str
) -> None:
    async with serve(address, LOGIN_ADDRESS_MAX_FAILURES=2) as client:
        await add_user(client, username)
        for _ in range(5):
            assert (await sign_in(client, username, PASSWORD)).status_code == 200


async def test_two_api_processes_on_one_redis_share_the_count(
    redis_url: str, database_url: str, address: str, username: str
) -> None:
    from app.storage.sql import SqlStorage, make_database
    from tests.conftest import truncate_all

    truncate_all(database_url)
    storage = SqlStorage(make_database(database_url, pool_size=10, max_overflow=10))
    values = {
        "STORAGE_BACKEND": "postgres",
        "PROCESS_ROLE": "api",
        "BROKER": "redis",
        "REDIS_URL": redis_url,
        "DATABASE_URL": database_url,
        "SECRET_KEY": "access-tests-secret-key-0123456789",
        "LOGIN_MAX_FAILURES": 5,
    }
    first = create_app(settings(**values), storage=storage, queue=RecordingQueue(storage))
    second = create_app(settings(**values), storage=storage, queue=RecordingQueue(storage))
    try:
        async with serve_from(first, address) as one, serve_from(second, address) as two:
            await add_user(one, username)
            attempts = [sign_in(one if n % 2 else two, username, WRONG) for n in range(12)]
            statuses = [r.status_code for r in await asyncio.gather(*attempts)]
            assert statuses.count(401) == 5 and statuses.count(429) == 7
            assert_throttled(await sign_in(one, username, PASSWORD))
            assert_throttled(await sign_in(two, username, PASSWORD))
    finally:
        await storage.close()


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_without_redis_sign_ins_are_not_throttled_and_a_warning_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    down = aioredis.Redis(port=unused_port(), retry=Retry(NoBackoff(), 0))
    throttle = LoginThrottle(down, ThrottleLimits.of(Settings(LOGIN_MAX_FAILURES=1)))
    try:
        with caplog.at_level(logging.WARNING, logger="app.access.throttle"):
            for _ in range(3):
                await throttle.attempt(username="carol", address="192.0.2.7")
            await throttle.succeeded(username="carol", address="192.0.2.7")
    finally:
        await down.aclose()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4
    assert "throttling is off for user 'carol' from 192.0.2.7" in lines[0]


def test_a_longest_lock_shorter_than_the_first_is_refused() -> None:
    with pytest.raises(ValueError, match="LOGIN_LOCK_MAX_SECONDS"):
        Settings(LOGIN_LOCK_SECONDS=60, LOGIN_LOCK_MAX_SECONDS=10)

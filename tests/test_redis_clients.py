"""Every Redis client of the gateway honours REDIS_URL alike — TLS and its certificate checks,
a client certificate, users and passwords, the database, a unix socket — on redis-servers of
the tests' own."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import redis
from dramatiq.brokers.redis import RedisBroker
from redis.exceptions import AuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError

from app.config import Settings
from app.core.redis import build_redis
from app.core.redis_pipe import PipelinedRedis
from app.queue.broker import build_broker
from app.queue.names import QUEUES, OperationKind
from app.queue.port import build_queue
from app.storage.memory import MemoryStorage
from app.system.checks import check_readiness, process_dependencies
from app.usage.wiring import hot_path_redis
from tests.operations.test_redis_enqueue import received
from tests.redis_servers import RedisServer
from tests.tls import Certificates

pytestmark = pytest.mark.slow

StartServer = Callable[..., RedisServer]
# A client of the gateway, built from settings as the process builds it, writing `value` under
# `key` and reading it back through the same client (the job path: sending a job whose id is
# `value`, and receiving it through the broker).
RoundTrip = Callable[[Settings, str, str], Awaitable[str]]


@pytest.fixture(autouse=True)
def _no_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env


def settings_for(url: str) -> Settings:
    return Settings(
        BROKER="redis",  # type: ignore[arg-type]
        REDIS_URL=url,
        STORAGE_BACKEND="postgres",  # type: ignore[arg-type]
        SECRET_KEY="a-secret-key-for-these-tests-only-0123456789",  # type: ignore[arg-type]
    )


async def _pipelined(settings: Settings, key: str, value: str) -> str:
    client = PipelinedRedis(settings.redis_endpoint(), connect_timeout=2.0)
    try:
        await client.set(key, value)
        return (await client.execute_command("GET", key)).decode()  # type: ignore[no-any-return]
    finally:
        await client.aclose()


async def _metering(settings: Settings, key: str, value: str) -> str:
    client = hot_path_redis(settings)
    assert client is not None
    try:
        await client.set(key, value)
        return (await client.execute_command("GET", key)).decode()  # type: ignore[no-any-return]
    finally:
        await client.aclose()


async def _async_client(settings: Settings, key: str, value: str) -> str:
    client = build_redis(settings)
    try:
        await client.set(key, value)
        return (await client.get(key)).decode()  # type: ignore[no-any-return]
    finally:
        await client.aclose()


async def _broker(settings: Settings, key: str, value: str) -> str:
    broker: Any = build_broker(settings)
    try:
        await asyncio.to_thread(broker.client.set, key, value)
        return (await asyncio.to_thread(broker.client.get, key)).decode()  # type: ignore[no-any-return]
    finally:
        broker.close()


async def _job_send(settings: Settings, key: str, value: str) -> str:
    broker = build_broker(settings)
    assert isinstance(broker, RedisBroker)
    queue = build_queue(settings, broker)
    try:
        await queue.send(value, OperationKind.CHAT_COMPLETION)
        (message,) = await asyncio.to_thread(
            received, broker, QUEUES[OperationKind.CHAT_COMPLETION]
        )
        return str(message.args[0])
    finally:
        await queue.aclose()
        broker.close()


async def _readiness(settings: Settings, key: str, value: str) -> str:
    client = build_redis(settings)
    try:
        readiness = await check_readiness(process_dependencies(settings, MemoryStorage(), client))
    finally:
        await client.aclose()
    check = readiness.checks["redis"]
    if check.status != "ok":
        raise ConnectionError(check.error)
    return value


CLIENTS: dict[str, RoundTrip] = {
    "pipelined": _pipelined,
    "metering": _metering,
    "async-client": _async_client,
    "broker": _broker,
    "job-send": _job_send,
    "readiness": _readiness,
}
# The clients that write keys (the others send jobs or ping).
KEY_CLIENTS = ("pipelined", "metering", "async-client", "broker")


def round_trip(name: str, url: str) -> str:
    """What client `name` of settings with REDIS_URL=`url` reads back."""
    value = f"value-{uuid.uuid4().hex[:8]}"
    got = asyncio.run(asyncio.wait_for(CLIENTS[name](settings_for(url), "greeting", value), 10))
    assert got == value
    return got


def chain(exc: BaseException) -> list[BaseException]:
    """`exc` and the exceptions it came from."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def errors_of(exc: BaseException) -> str:
    """The messages of `exc` and of the exceptions it came from."""
    return " <- ".join(f"{type(e).__name__}: {e}" for e in chain(exc))


@pytest.fixture
def tls_server(redis_server: StartServer, certificates: Certificates) -> RedisServer:
    return redis_server(tls=certificates, tls_only=True)


@pytest.mark.parametrize("client", CLIENTS)
def test_each_client_talks_tls_to_a_server_signed_by_the_ca_the_url_names(
    client: str, tls_server: RedisServer, certificates: Certificates
) -> None:
    url = f"rediss://127.0.0.1:{tls_server.tls_port}/0?ssl_ca_certs={certificates.ca}"
    round_trip(client, url)


@pytest.mark.parametrize("client", CLIENTS)
def test_each_client_checks_the_certificate_by_default_and_refuses_one_it_cannot_verify(
    client: str, tls_server: RedisServer
) -> None:
    for url in (
        f"rediss://127.0.0.1:{tls_server.tls_port}/0",
        f"rediss://127.0.0.1:{tls_server.tls_port}/0?ssl_cert_reqs=required",
    ):
        with pytest.raises(Exception) as caught:
            round_trip(client, url)
        assert "certificate verif" in errors_of(caught.value)


@pytest.mark.parametrize("client", CLIENTS)
def test_each_client_connects_without_checking_when_ssl_cert_reqs_is_none(
    client: str, tls_server: RedisServer
) -> None:
    round_trip(client, f"rediss://127.0.0.1:{tls_server.tls_port}/0?ssl_cert_reqs=none")


@pytest.mark.parametrize("client", ["pipelined", "async-client", "broker"])
def test_each_client_checks_the_host_name_against_the_certificate(
    client: str, tls_server: RedisServer, certificates: Certificates, tmp_path: Path
) -> None:
    # The certificate names 127.0.0.1 and localhost, and nothing else resolves to the server.
    url = f"rediss://localhost:{tls_server.tls_port}/0?ssl_ca_certs={certificates.ca}"
    round_trip(client, url)
    other = certificates.ca.parent / "other-ca.crt"
    other.write_bytes(certificates.server_cert.read_bytes())  # a CA that did not sign it
    with pytest.raises(Exception) as caught:
        round_trip(client, f"rediss://127.0.0.1:{tls_server.tls_port}/0?ssl_ca_certs={other}")
    assert "certificate verif" in errors_of(caught.value)


@pytest.mark.parametrize("client", CLIENTS)
def test_each_client_presents_the_client_certificate_the_url_names(
    client: str, redis_server: StartServer, certificates: Certificates
) -> None:
    server = redis_server(tls=certificates, tls_only=True, tls_auth_clients=True)
    base = f"rediss://127.0.0.1:{server.tls_port}/0?ssl_ca_certs={certificates.ca}"
    own = f"&ssl_certfile={certificates.client_cert}&ssl_keyfile={certificates.client_key}"
    round_trip(client, base + own)
    with pytest.raises(Exception) as caught:
        round_trip(client, base)
    # The server ends the connection (an alert, or a close before or after a write, depending
    # on timing): each client words it its own way, but as a connection failure.
    assert any(isinstance(e, RedisConnectionError | ConnectionError) for e in chain(caught.value))


PASSWORD = "p@ss:w/rd?#%"  # every character a URL gives a meaning to
# Not the default user's: a client that dropped the user name would be refused.
ALICE_PASSWORD = "alice's own: @/?#%"


@pytest.fixture
def locked_server(redis_server: StartServer) -> RedisServer:
    return redis_server(password=PASSWORD, users=(("alice", ALICE_PASSWORD),))


@pytest.mark.parametrize("client", CLIENTS)
def test_each_client_logs_in_with_the_percent_encoded_password_of_the_url(
    client: str, locked_server: RedisServer
) -> None:
    round_trip(client, f"redis://:{quote(PASSWORD, safe='')}@127.0.0.1:{locked_server.port}/0")


@pytest.mark.parametrize("client", CLIENTS)
def test_each_client_logs_in_as_the_acl_user_of_the_url(
    client: str, locked_server: RedisServer
) -> None:
    url = f"redis://alice:{quote(ALICE_PASSWORD, safe='')}@127.0.0.1:{locked_server.port}/0"
    round_trip(client, url)


def test_the_acl_user_is_the_one_the_pipelined_client_runs_as(locked_server: RedisServer) -> None:
    async def whoami() -> bytes:
        client = PipelinedRedis(
            f"redis://alice:{quote(ALICE_PASSWORD, safe='')}@127.0.0.1:{locked_server.port}/0"
        )
        try:
            return await client.execute_command("ACL", "WHOAMI")  # type: ignore[no-any-return]
        finally:
            await client.aclose()

    assert asyncio.run(whoami()) == b"alice"


@pytest.mark.parametrize("client", ["pipelined", "async-client", "broker"])
def test_a_wrong_password_is_refused_as_an_authentication_error(
    client: str, locked_server: RedisServer
) -> None:
    with pytest.raises(AuthenticationError):
        round_trip(client, f"redis://alice:wrong@127.0.0.1:{locked_server.port}/0")


@pytest.mark.parametrize("client", KEY_CLIENTS)
@pytest.mark.parametrize("where", ["path", "query"])
def test_each_client_uses_the_database_the_url_names(
    client: str, where: str, redis_server: StartServer
) -> None:
    server = redis_server()
    base = f"redis://127.0.0.1:{server.port}"
    value = round_trip(client, f"{base}/5" if where == "path" else f"{base}?db=5")
    with redis.Redis(port=server.port, db=5) as five, redis.Redis(port=server.port) as zero:
        assert five.get("greeting") == value.encode()
        assert zero.get("greeting") is None


@pytest.mark.parametrize("client", CLIENTS)
def test_each_client_reaches_a_server_on_a_unix_socket(
    client: str, redis_server: StartServer
) -> None:
    server = redis_server(unix_socket=True)
    value = round_trip(client, f"unix://{server.socket}?db=2")
    if client in KEY_CLIENTS:
        with redis.Redis(port=server.port, db=2) as two:
            assert two.get("greeting") == value.encode()

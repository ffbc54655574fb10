"""No secret is ever logged: canary values go through every path that logs, in both formats.

API keys (valid and not), a provider credential used against an upstream that fails and echoes
what it was sent, passwords at sign-in (right and wrong), webhook secrets and header values of a
delivery that fails, and the passwords of DATABASE_URL and REDIS_URL when their servers cannot
be reached. Everything logged at DEBUG is captured twice: the records themselves (caplog, their
arguments included), and the lines the handlers of `log_config` write, in JSON and in text;
prints too. No canary may appear in any of them.
"""

from __future__ import annotations

import logging
import logging.config
from collections.abc import AsyncIterator, Iterator
from io import StringIO
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from fastapi import FastAPI
from pydantic import ValidationError

from app.cli import describe, log_config
from app.config import Settings, without_passwords
from app.main import create_app
from app.operations.runner import JobTimings, OperationRunner
from app.services import Services, build_handlers
from app.storage.memory import MemoryStorage
from tests.fakes import RecordingQueue
from tests.redis_servers import free_port
from tests.webhooks.receiver import Received, Receiver, Reply

ADMIN_KEY = "gw-canary-admin-key-a91f3c57e2d0b4"
INVALID_KEY = "gw-canary-invalid-key-5b1e0c9a7d"
PROVIDER_SECRET = "sk-canary-provider-secret-8e2f4d"
ADMIN_PASSWORD = "canary-admin-password-61c3"
WRONG_PASSWORD = "canary-wrong-password-0f7a"
USER_PASSWORD = "canary-user-password-2d9b"
HEADER_VALUE = "canary-header-value-4a6e"
URL_TOKEN = "canary-url-token-5f0b"  # webhook URLs often carry one (Slack's, Discord's)
DB_PASSWORD = "canary-db-password-7c1d"
REDIS_PASSWORD = "canary-redis-password-3e8f"
SECRET_KEY = "canary-encryption-key-Zq8Xw2Vb7Nm4Lk1Jh6Gf"
FIXED = [
    ADMIN_KEY,
    INVALID_KEY,
    PROVIDER_SECRET,
    ADMIN_PASSWORD,
    WRONG_PASSWORD,
    USER_PASSWORD,
    HEADER_VALUE,
    URL_TOKEN,
    DB_PASSWORD,
    REDIS_PASSWORD,
    SECRET_KEY,
]
FAST = JobTimings(lease=5, heartbeat=1, retry_base=0.0, retry_max=0.0, resend_after=0.2)
CHAT = "/v1/chat/completions"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


class Captured:
    """Everything logged (and printed) during a test, as text."""

    def __init__(self, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]):
        self._caplog = caplog
        self._capsys = capsys
        self.stream = StringIO()

    def text(self) -> str:
        out, err = self._capsys.readouterr()
        records = [
            f"{r.getMessage()} {r.exc_text or ''} {r.__dict__!r}" for r in self._caplog.records
        ]
        return "\n".join([self.stream.getvalue(), out, err, *records])

    def assert_clean(self, *secrets: str) -> None:
        text = self.text()
        assert self.stream.getvalue().strip(), "nothing was logged: the capture is broken"
        leaked = [secret for secret in (*FIXED, *secrets) if secret in text]
        assert not leaked, f"secrets in the logs: {leaked}"


@pytest.fixture(autouse=True)
def _no_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(params=["json", "text"])
def logs(
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> Iterator[Captured]:
    """The process's logging as `gateway` sets it up (LOG_FORMAT, DEBUG), captured."""
    settings = Settings(LOG_FORMAT=request.param, LOG_LEVEL="DEBUG")
    config = log_config(settings)
    root = logging.getLogger()
    loggers = [root, *(logging.getLogger(name) for name in config.get("loggers", {}))]
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    logging.config.dictConfig(config)
    captured = Captured(caplog, capsys)
    # What the gateway's own handlers write (its formatters, its context filter), kept here.
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler):
                handler.setStream(captured.stream)
    caplog.set_level(logging.DEBUG)
    try:
        yield captured
    finally:
        for logger, handlers, level, propagate in saved:
            logger.handlers[:] = handlers
            logger.setLevel(level)
            logger.propagate = propagate


def echoing(status: int) -> Any:
    """An endpoint that fails, quoting every header it got (an Authorization one included)."""

    async def respond(request: Received) -> Reply:
        quoted = "; ".join(f"{k}: {v}" for k, v in request.headers.items())
        body = orjson.dumps({"error": {"message": f"refused, you sent {quoted}"}})
        return status, body, {"content-type": "application/json"}

    return respond


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient, RecordingQueue]]:
    storage = MemoryStorage()
    queue = RecordingQueue(storage)
    settings = Settings(
        BROKER="stub",
        ADMIN_API_KEY=ADMIN_KEY,
        ADMIN_DEFAULT_PASSWORD=ADMIN_PASSWORD,
        SECRET_KEY=SECRET_KEY,
        OUTBOUND_ALLOWED_HOSTS="127.0.0.1",
        UPSTREAM_MAX_RETRIES=0,
        UPSTREAM_TIMEOUT_SECONDS=2,
        WEBHOOK_RETRY_SCHEDULE="0,0",
        LOG_REQUEST_BODIES=True,
    )
    app = create_app(settings, storage=storage, queue=queue)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield app, client, queue


async def run_jobs(app: FastAPI, queue: RecordingQueue) -> None:
    """Run every job sent, as a worker would, retries included."""
    services: Services = app.state.services
    runner = OperationRunner(
        services.storage, queue, build_handlers(services), timings=FAST, events=services.events
    )
    for _ in range(20):
        if not queue.sent:
            return
        await runner.execute(queue.sent.pop(0).operation_id)
    raise AssertionError("jobs kept coming")


async def test_keys_credentials_passwords_and_webhook_secrets_are_never_logged(
    logs: Captured, gateway: tuple[FastAPI, httpx.AsyncClient, RecordingQueue]
) -> None:
    app, client, queue = gateway
    upstream = await Receiver(echoing(500)).start()
    endpoint = await Receiver(echoing(500)).start()
    try:
        # API keys: a valid one, and one that is not, in both headers, on both paths.
        created = await client.post("/admin/keys", json={"name": "canary"}, headers=ADMIN)
        assert created.status_code == 201, created.text
        key = created.json()["key"]
        bearer = {"Authorization": f"Bearer {key}"}
        mock = {"model": "mock", "messages": [{"role": "user", "content": "hi"}]}
        assert (await client.post(CHAT, json=mock, headers=bearer)).status_code == 200
        assert (await client.get("/v1/models", headers={"x-api-key": key})).status_code == 200
        for headers in (
            {"Authorization": f"Bearer {INVALID_KEY}"},
            {"x-api-key": INVALID_KEY},
            {"Authorization": INVALID_KEY},
        ):
            assert (await client.post(CHAT, json=mock, headers=headers)).status_code == 401
            assert (await client.get("/v1/models", headers=headers)).status_code == 401
            assert (await client.post(f"{CHAT}?x=1", json=mock, headers=headers)).status_code == 401

        # A provider credential, sent to an upstream that fails quoting it.
        credential = {"id": "canary", "provider": "openai", "secret": PROVIDER_SECRET}
        assert (
            await client.post("/admin/credentials", json=credential, headers=ADMIN)
        ).status_code == 201
        model = {
            "id": "leaky",
            "provider": "openai",
            "provider_model": "gpt-canary",
            "credential_id": "canary",
            "parameters": {"base_url": upstream.url},
        }
        created_model = await client.post("/admin/models", json=model, headers=ADMIN)
        assert created_model.status_code == 201, created_model.text
        leaky = {"model": "leaky", "messages": [{"role": "user", "content": "hi"}]}
        failed = await client.post(CHAT, json=leaky, headers=bearer)
        assert failed.status_code >= 500
        streamed = await client.post(CHAT, json={**leaky, "stream": True}, headers=bearer)
        assert streamed.status_code >= 400 or b"error" in streamed.content
        embedding = {**model, "id": "leaky-embed", "kind": "embedding"}
        added = await client.post("/admin/models", json=embedding, headers=ADMIN)
        assert added.status_code == 201
        embed = {"model": "leaky-embed", "input": "hi"}
        embedded = await client.post("/v1/embeddings", json=embed, headers=bearer)
        assert embedded.status_code >= 500
        accepted = await client.post(f"{CHAT}?async=true", json=leaky, headers=bearer)
        assert accepted.status_code == 202
        await run_jobs(app, queue)
        job = await client.get(f"/v1/operations/{accepted.json()['operation_id']}", headers=bearer)
        assert job.json()["status"] == "failed"
        # Nor does any answer quote it back, though the upstream's error did.
        for answer in (failed, streamed, embedded, job):
            assert PROVIDER_SECRET not in answer.text, answer.text
        assert len(upstream.requests) >= 3
        assert all(PROVIDER_SECRET in str(r.headers) for r in upstream.requests)

        # Passwords at sign-in, right and wrong, of the administrator and of a new user.
        signed_in = await client.post(
            "/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
        )
        assert signed_in.status_code == 200, signed_in.text
        token = signed_in.json()["access_token"]
        user = {"username": "carol", "password": USER_PASSWORD}
        assert (await client.post("/admin/users", json=user, headers=ADMIN)).status_code == 201
        assert (await client.post("/auth/login", json=user)).status_code == 200
        for username in ("admin", "carol", "nobody"):
            wrong = {"username": username, "password": WRONG_PASSWORD}
            assert (await client.post("/auth/login", json=wrong)).status_code == 401
        session = {"Authorization": f"Bearer {token}"}
        assert (await client.get("/admin/users", headers=session)).status_code == 200

        # A webhook with a secret and a header value, delivered to an endpoint that fails.
        url = f"{endpoint.url}/{URL_TOKEN}?token={URL_TOKEN}"
        hook = {"url": url, "headers": {"X-Canary": HEADER_VALUE}}
        created_hook = await client.post("/admin/webhooks", json=hook, headers=ADMIN)
        assert created_hook.status_code == 201, created_hook.text
        webhook_id, signing = created_hook.json()["id"], created_hook.json()["secret"]
        rotated = await client.post(f"/admin/webhooks/{webhook_id}/rotate-secret", headers=ADMIN)
        assert rotated.status_code == 200
        assert (
            await client.post(f"/admin/webhooks/{webhook_id}/ping", headers=ADMIN)
        ).status_code == 202
        await run_jobs(app, queue)
        assert len(endpoint.requests) == 2
        assert all(r.headers["x-canary"] == HEADER_VALUE for r in endpoint.requests)
    finally:
        await upstream.close()
        await endpoint.close()

    logs.assert_clean(key, token, signing, rotated.json()["secret"], signing.removeprefix("whsec_"))


def unreachable_settings() -> Settings:
    closed = free_port()
    return Settings(
        PROCESS_ROLE="api",
        STORAGE_BACKEND="postgres",
        DATABASE_URL=f"postgresql://gateway:{DB_PASSWORD}@127.0.0.1:{closed}/gateway",
        BROKER="redis",
        REDIS_URL=f"redis://:{REDIS_PASSWORD}@127.0.0.1:{closed}/1",
        SECRET_KEY=SECRET_KEY,
        ADMIN_API_KEY=ADMIN_KEY,
        DB_CONNECT_TIMEOUT=0.5,
    )


def test_settings_show_no_password_of_their_urls() -> None:
    settings = unreachable_settings()
    for shown in (repr(settings), str(settings), f"{settings!r}", f"{settings}"):
        for secret in (DB_PASSWORD, REDIS_PASSWORD, SECRET_KEY, ADMIN_KEY):
            assert secret not in shown
        assert "postgresql://gateway:***@127.0.0.1:" in shown
        assert "redis://:***@127.0.0.1:" in shown
    # They are still there for the clients that connect with them.
    assert DB_PASSWORD in settings.DATABASE_URL and REDIS_PASSWORD in settings.REDIS_URL


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:pw@h:5432/db", "postgresql://u:***@h:5432/db"),
        (
            "postgresql://u@h/db?password=pw&sslmode=require",
            "postgresql://u@h/db?password=***&sslmode=require",
        ),
        ("postgresql://h/db?sslpassword=pw", "postgresql://h/db?sslpassword=***"),
        (
            "rediss://user:p%40ss@h:6380/0?ssl_password=pw",
            "rediss://user:***@h:6380/0?ssl_password=***",
        ),
        ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
        ("unix:///run/redis.sock?password=pw&db=2", "unix:///run/redis.sock?password=***&db=2"),
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("postgresql://u:a?b#c/d@h/db", "postgresql://u:***@h/db"),
        ("redis://h:6379/0?ssl_password=pw#x", "redis://h:6379/0?ssl_password=***#x"),
    ],
)
def test_urls_are_shown_without_passwords(url: str, shown: str) -> None:
    assert without_passwords(url) == shown


def test_refused_urls_are_named_without_their_passwords() -> None:
    for values in (
        {"DATABASE_URL": f"postgresql://u:{DB_PASSWORD}@h/db?bogus=1"},
        {"BROKER": "redis", "REDIS_URL": f"redis://:{REDIS_PASSWORD}@h:notaport/0"},
    ):
        with pytest.raises(ValidationError) as refused:
            Settings(STORAGE_BACKEND="postgres", SECRET_KEY=SECRET_KEY, **values)
        # (`errors()` keeps the input, as pydantic does; nothing logs it.)
        for shown in (str(refused.value), describe(refused.value)):
            assert DB_PASSWORD not in shown and REDIS_PASSWORD not in shown


async def test_unreachable_database_and_redis_are_logged_without_their_passwords(
    logs: Captured,
) -> None:
    app = create_app(unreachable_settings())
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            assert (await client.get("/ready")).status_code == 503
            mock = {"model": "mock", "messages": [{"role": "user", "content": "hi"}]}
            assert (await client.post(CHAT, json=mock, headers=ADMIN)).status_code == 503
            assert (await client.get("/v1/models", headers=ADMIN)).status_code == 503
    logs.assert_clean()

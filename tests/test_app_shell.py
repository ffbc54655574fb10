"""The app shell: operator endpoints, request ids, body limits and the OpenAI error body."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from pydantic import BaseModel

from app import __version__
from app.config import Settings
from app.core import errors
from app.main import create_app
from app.storage.memory import MemoryStorage
from tests.redis_servers import RedisServer

CLOSED_PORT_DB = "postgresql://postgres@127.0.0.1:1/gateway"


@pytest.fixture(autouse=True)
def _no_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env


@pytest.fixture
def app() -> FastAPI:
    return create_app(Settings(MAX_REQUEST_BYTES=1024))


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def assert_openai_error(body: Any, type_: str, code: str | None) -> dict[str, Any]:
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == type_
    assert error["code"] == code
    return error


def test_health_reports_the_version(client: TestClient) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "version": __version__}


def test_live_answers_ok(client: TestClient) -> None:
    response = client.get("/live")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_ready_on_memory_storage_reports_the_backend(client: TestClient) -> None:
    response = client.get("/ready")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ready",
        "checks": {
            "database": {"status": "ok", "backend": "memory"},
            "redis": {"status": "ok", "backend": "fakeredis"},
        },
    }


def redis_settings(database_url: str, redis_url: str, **extra: Any) -> Settings:
    return Settings(
        STORAGE_BACKEND="postgres",  # type: ignore[arg-type]
        DATABASE_URL=database_url,
        SECRET_KEY="test-secret-key-of-sufficient-length",  # type: ignore[arg-type]
        BROKER="redis",  # type: ignore[arg-type]
        REDIS_URL=redis_url,
        **extra,
    )


def connections_received(server: RedisServer) -> int:
    with redis.Redis(port=server.port) as client:
        return int(client.info("stats")["total_connections_received"]) - 1  # less this one


@pytest.mark.slow
def test_ready_pings_the_redis_the_services_use_over_their_own_connections(
    database_url: str, redis_server: Callable[..., RedisServer]
) -> None:
    server = redis_server()
    # The response cache and metering on Redis too: all on the one server, probed once.
    settings = redis_settings(
        database_url, f"redis://127.0.0.1:{server.port}/0", CACHE_BACKEND="redis"
    )
    with TestClient(create_app(settings)) as client:
        first = client.get("/ready")
        assert first.status_code == 200
        checks = first.json()["checks"]
        assert set(checks) == {"database", "redis"}
        assert all(c["status"] == "ok" and c["latency_ms"] >= 0 for c in checks.values())
        opened = connections_received(server)
        for _ in range(5):
            assert client.get("/ready").status_code == 200
        # No connection of its own per probe: the pool the services share answers.
        assert connections_received(server) - opened == 1  # only the count's own


@pytest.mark.slow
def test_ready_is_503_naming_redis_while_it_is_down_and_200_once_it_is_back(
    database_url: str, redis_server: Callable[..., RedisServer]
) -> None:
    server = redis_server()
    settings = redis_settings(database_url, f"redis://127.0.0.1:{server.port}/0")
    with TestClient(create_app(settings)) as client:
        assert client.get("/ready").status_code == 200
        server.stop()
        down = client.get("/ready")
        assert down.status_code == 503
        body = down.json()
        assert body["status"] == "not_ready"
        assert body["checks"]["database"]["status"] == "ok"
        assert body["checks"]["redis"] == {
            "status": "unavailable",
            "error": "redis unreachable: ConnectionError",
        }
        server.start()
        back = client.get("/ready")
        assert back.status_code == 200, back.text
        assert back.json()["status"] == "ready"


@pytest.mark.slow
def test_ready_is_503_naming_only_the_database_when_redis_answers(
    redis_server: Callable[..., RedisServer],
) -> None:
    server = redis_server()
    settings = redis_settings(
        CLOSED_PORT_DB, f"redis://127.0.0.1:{server.port}/0", DB_CONNECT_TIMEOUT=1
    )
    with TestClient(create_app(settings)) as client:
        response = client.get("/ready")
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["database"]["status"] == "unavailable"
    assert "database" in checks["database"]["error"]
    assert checks["redis"]["status"] == "ok"


@pytest.mark.slow
def test_ready_probes_the_dependencies_at_once_each_within_its_time() -> None:
    # A server that accepts connections and never answers stands for a hung database and Redis.
    with socket.create_server(("127.0.0.1", 0), backlog=64) as silent:
        port = silent.getsockname()[1]
        settings = redis_settings(
            f"postgresql://postgres@127.0.0.1:{port}/gateway",
            f"redis://127.0.0.1:{port}/0",
            DB_CONNECT_TIMEOUT=3,
        )
        with TestClient(create_app(settings)) as client:
            started = time.monotonic()
            response = client.get("/ready")
            elapsed = time.monotonic() - started
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["database"] == {"status": "unavailable", "error": "no answer within 1.5 s"}
    assert checks["redis"] == {"status": "unavailable", "error": "no answer within 1.5 s"}
    assert 1.4 < elapsed < 2.0  # one probe's time, not the sum of both: under two seconds


def test_ready_is_503_naming_the_database_when_postgres_is_unreachable() -> None:
    settings = Settings(
        STORAGE_BACKEND="postgres",
        DATABASE_URL=CLOSED_PORT_DB,
        SECRET_KEY="test-secret-key-of-sufficient-length",
        DB_CONNECT_TIMEOUT=1,
    )
    with TestClient(create_app(settings)) as client:
        started = time.monotonic()
        response = client.get("/ready")
        elapsed = time.monotonic() - started
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "not_ready"
    assert body["checks"]["database"]["status"] == "unavailable"
    assert "database" in body["checks"]["database"]["error"]
    assert elapsed < 4


def test_ready_is_503_naming_redis_when_the_redis_broker_is_unreachable() -> None:
    settings = Settings(
        STORAGE_BACKEND="postgres",
        DATABASE_URL=CLOSED_PORT_DB,
        SECRET_KEY="test-secret-key-of-sufficient-length",
        DB_CONNECT_TIMEOUT=1,
        BROKER="redis",
        REDIS_URL="redis://127.0.0.1:1/0",
    )
    with TestClient(create_app(settings)) as client:
        started = time.monotonic()
        response = client.get("/ready")
        elapsed = time.monotonic() - started
    assert response.status_code == 503
    redis_check = response.json()["checks"]["redis"]
    assert redis_check["status"] == "unavailable"
    assert redis_check["error"] == "redis unreachable: ConnectionError"
    assert elapsed < 4


def test_a_generated_request_id_is_echoed_and_seen_by_the_route(app: FastAPI) -> None:
    @app.get("/whoami")
    async def whoami(request: Request) -> dict[str, str]:
        return {"request_id": request.state.request_id}

    with TestClient(app) as client:
        response = client.get("/whoami")
    request_id = response.headers["x-request-id"]
    assert request_id.startswith("req_")
    assert response.json() == {"request_id": request_id}


def test_a_sane_incoming_request_id_is_kept(client: TestClient) -> None:
    response = client.get("/health", headers={"X-Request-ID": "abc.DEF-123_x"})
    assert response.headers["x-request-id"] == "abc.DEF-123_x"


@pytest.mark.parametrize("incoming", ["has space", "a/b", "x" * 129, "caf\u00e9".encode()])
def test_an_insane_incoming_request_id_is_replaced(
    client: TestClient, incoming: str | bytes
) -> None:
    response = client.get("/health", headers={"X-Request-ID": incoming})
    assert response.headers["x-request-id"].startswith("req_")


@pytest.mark.parametrize(
    ("error", "status", "type_"),
    [
        (errors.InvalidInput("bad temperature", param="temperature"), 400, "invalid_request_error"),
        (errors.InvalidId("model", "no such!", param="model"), 400, "invalid_request_error"),
        (errors.Unauthenticated("missing API key"), 401, "authentication_error"),
        (errors.BudgetExceeded("monthly budget reached"), 402, "insufficient_quota"),
        (errors.PermissionDenied("admin rights needed"), 403, "permission_error"),
        (errors.NotFound("operation", "op-1"), 404, "not_found_error"),
        (errors.Conflict("idempotency key reused"), 409, "invalid_request_error"),
        (errors.DuplicateKey("model 'gpt' already exists"), 409, "invalid_request_error"),
        (errors.StaleVersion("model", "gpt", 3), 409, "invalid_request_error"),
        (errors.RateLimited("slow down", retry_after=1.5), 429, "rate_limit_error"),
        (errors.Unavailable("database unreachable"), 503, "service_unavailable_error"),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else None,
)
def test_a_domain_error_renders_the_openai_body_with_its_status(
    app: FastAPI, error: errors.DomainError, status: int, type_: str
) -> None:
    @app.get("/fail")
    async def fail() -> None:
        raise error

    with TestClient(app) as client:
        response = client.get("/fail")
    assert response.status_code == status
    body = assert_openai_error(response.json(), type_, error.code)
    assert body["message"] == error.message
    assert body["param"] == error.param


def test_rate_limited_answers_with_retry_after_in_whole_seconds(app: FastAPI) -> None:
    @app.get("/fail")
    async def fail() -> None:
        raise errors.RateLimited("slow down", retry_after=1.2)

    with TestClient(app) as client:
        response = client.get("/fail")
    assert response.headers["retry-after"] == "2"
    assert response.headers["retry-after-ms"] == "1200"


class Message(BaseModel):
    role: str
    content: str


class ChatBody(BaseModel):
    model: str
    messages: list[Message]


def test_a_validation_error_is_400_naming_the_field(app: FastAPI) -> None:
    @app.post("/chat")
    async def chat(body: ChatBody) -> dict[str, str]:
        return {"model": body.model}

    with TestClient(app) as client:
        response = client.post("/chat", json={"model": "m", "messages": [{"role": "user"}]})
    assert response.status_code == 400
    error = assert_openai_error(response.json(), "invalid_request_error", "missing")
    assert error["param"] == "messages.0.content"
    assert "messages.0.content" in error["message"]


def test_a_query_validation_error_names_the_parameter(app: FastAPI) -> None:
    @app.get("/items")
    async def items(limit: int) -> dict[str, int]:
        return {"limit": limit}

    with TestClient(app) as client:
        response = client.get("/items", params={"limit": "many"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "limit"


def test_malformed_json_is_400_json_parse_error(app: FastAPI) -> None:
    @app.post("/chat")
    async def chat(body: ChatBody) -> dict[str, str]:
        return {"model": body.model}

    with TestClient(app) as client:
        response = client.post(
            "/chat", content=b'{"model": ', headers={"content-type": "application/json"}
        )
    assert response.status_code == 400
    error = assert_openai_error(response.json(), "invalid_request_error", "json_parse_error")
    assert error["param"] is None


def test_an_unknown_route_is_404_in_the_openai_body(client: TestClient) -> None:
    response = client.get("/v1/nowhere")
    assert response.status_code == 404
    error = assert_openai_error(response.json(), "not_found_error", "unknown_url")
    assert "/v1/nowhere" in error["message"]


def test_a_wrong_method_is_405_in_the_openai_body_with_allow(client: TestClient) -> None:
    response = client.post("/health")
    assert response.status_code == 405
    assert_openai_error(response.json(), "invalid_request_error", "method_not_allowed")
    assert "GET" in response.headers["allow"]


def test_an_unexpected_error_is_500_without_its_text(
    app: FastAPI, caplog: pytest.LogCaptureFixture
) -> None:
    @app.get("/crash")
    async def crash() -> None:
        raise RuntimeError("password=hunter2 leaked")

    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/crash", headers={"X-Request-ID": "trace-me"})
    assert response.status_code == 500
    assert "hunter2" not in response.text
    error = assert_openai_error(response.json(), "api_error", "internal_error")
    assert "trace-me" in error["message"]
    assert response.headers["x-request-id"] == "trace-me"
    logged = [r for r in caplog.records if r.name == "app.core.api_errors"]
    assert logged and logged[0].exc_info is not None
    assert "trace-me" in logged[0].getMessage()


def test_a_declared_oversized_body_is_413(app: FastAPI) -> None:
    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        return {"size": len(await request.body())}

    with TestClient(app) as client:
        assert client.post("/echo", content=b"x" * 1024).json() == {"size": 1024}
        response = client.post("/echo", content=b"x" * 1025)
    assert response.status_code == 413
    assert_openai_error(response.json(), "invalid_request_error", "request_too_large")
    assert response.headers["x-request-id"]


def test_a_streamed_oversized_body_is_413(app: FastAPI) -> None:
    @app.post("/chat")
    async def chat(body: ChatBody) -> dict[str, str]:
        return {"model": body.model}

    def chunks() -> Iterator[bytes]:
        yield b'{"model": "'
        for _ in range(10):
            yield b"x" * 200

    with TestClient(app) as client:
        response = client.post(
            "/chat", content=chunks(), headers={"content-type": "application/json"}
        )
    assert "content-length" not in response.request.headers
    assert response.status_code == 413
    assert_openai_error(response.json(), "invalid_request_error", "request_too_large")


class TrackedStorage(MemoryStorage):
    """A memory storage that remembers whether it was closed."""

    closed = False

    async def close(self) -> None:
        self.closed = True


def test_the_lifespan_closes_the_storage_it_built(monkeypatch: pytest.MonkeyPatch) -> None:
    built = TrackedStorage()
    monkeypatch.setattr("app.main.build_storage", lambda settings: built)
    app = create_app(Settings())
    with TestClient(app):
        assert app.state.storage is built
        assert built.closed is False
    assert built.closed is True


def test_a_storage_passed_in_is_used_and_left_open() -> None:
    storage = TrackedStorage()
    app = create_app(Settings(), storage=storage)
    with TestClient(app) as client:
        assert client.get("/ready").status_code == 200
        assert app.state.storage is storage
    assert storage.closed is False


def test_openapi_docs_are_served(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    assert "/ready" in client.get("/openapi.json").json()["paths"]


def test_the_docs_page_loads_every_asset_from_the_gateway_itself(client: TestClient) -> None:
    page = client.get("/docs").text
    assert "://" not in page.replace("http://www.w3.org", "")  # no CDN, no other host
    assets = re.findall(r"""(?:src|href)=["']?(/[^"'\s>]+)""", page)
    assert {Path(url).suffix for url in assets} >= {".js", ".css"}
    for url in assets:
        answer = client.get(url)
        assert answer.status_code == 200, url
        assert len(answer.content) > 0, url
    assert "/openapi.json" in page
    assert client.get("/redoc").status_code == 404  # ReDoc would need a CDN


def test_a_request_meeting_a_database_that_is_down_gets_503_with_a_retry_hint() -> None:
    settings = Settings(
        STORAGE_BACKEND="postgres",
        DATABASE_URL=CLOSED_PORT_DB,
        SECRET_KEY="test-secret-key-of-sufficient-length",
        DB_CONNECT_TIMEOUT=1,
    )
    key = {"Authorization": "Bearer gw-some-key-that-cannot-be-looked-up-now"}
    body = {"model": "mock", "messages": [{"role": "user", "content": "hi"}]}
    with TestClient(create_app(settings)) as client:
        for response in (
            client.get("/v1/models", headers=key),
            client.post("/v1/chat/completions", headers=key, json=body),  # the fast path
        ):
            assert response.status_code == 503
            assert response.headers["retry-after"] == "1"
            assert response.json()["error"]["type"] == "service_unavailable_error"

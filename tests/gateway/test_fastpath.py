"""The chat fast path: which requests it answers, and that it answers them as the route would."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

import app.fastpath as fastpath
from app.core.errors import NotFound
from app.gateway.chat import ChatService
from app.gateway.router import answer_directly, submit_job
from app.gateway.routing import Route
from app.models.entities import Model, ModelKind
from app.services import Services
from tests.gateway.conftest import ADMIN, chat


@pytest.fixture
def storage_of_app(services: Services) -> Any:
    return services.storage


@pytest.fixture
def answered(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The models of the calls the fast path answered itself."""
    calls: list[str] = []
    original = answer_directly

    async def recording(
        calls_: Any, principal: Any, request: Any, *args: Any, **kwargs: Any
    ) -> Any:
        calls.append(request.model)
        return await original(calls_, principal, request, *args, **kwargs)

    monkeypatch.setattr(fastpath, "answer_directly", recording)
    return calls


async def test_a_plain_chat_completion_is_answered_by_the_fast_path(
    client: httpx.AsyncClient, answered: list[str]
) -> None:
    response = await client.post("/v1/chat/completions", json=chat("mock"))
    assert response.status_code == 200, response.text
    assert response.json()["object"] == "chat.completion"
    assert response.headers["x-gateway-model"] == "mock"
    assert response.headers["x-request-id"].startswith("req_")
    assert answered == ["mock"]


@pytest.fixture
def submitted(monkeypatch: pytest.MonkeyPatch) -> list[str | None]:
    """The idempotency keys of the jobs the fast path submitted itself."""
    calls: list[str | None] = []
    original = submit_job

    async def recording(
        calls_: Any, principal: Any, request: Any, *args: Any, **kwargs: Any
    ) -> Any:
        calls.append(args[1])
        return await original(calls_, principal, request, *args, **kwargs)

    monkeypatch.setattr(fastpath, "submit_job", recording)
    return calls


async def test_a_job_is_submitted_by_the_fast_path_and_replayed_by_its_key(
    client: httpx.AsyncClient, submitted: list[str | None]
) -> None:
    url = "/v1/chat/completions?async=true"
    first = await client.post(url, json=chat("mock"), headers={"idempotency-key": "k-1"})
    assert first.status_code == 202, first.text
    assert first.headers["location"] == f"/v1/operations/{first.json()['operation_id']}"
    again = await client.post(url, json=chat("mock"), headers={"idempotency-key": "k-1"})
    assert again.status_code == 202
    assert again.json()["operation_id"] == first.json()["operation_id"]
    assert again.headers["idempotent-replayed"] == "true"
    other = await client.post(
        url, json=chat("mock", temperature=1), headers={"idempotency-key": "k-1"}
    )
    assert other.status_code == 409
    assert submitted == ["k-1", "k-1", "k-1"]


async def test_jobs_refused_by_the_fast_path_have_the_routes_errors(
    client: httpx.AsyncClient, submitted: list[str | None]
) -> None:
    url = "/v1/chat/completions?async=true"
    streamed = await client.post(url, json=chat("mock", stream=True))
    assert streamed.status_code == 400
    assert streamed.json()["error"]["param"] == "stream"
    bad_cache = await client.post(url, json=chat("mock"), headers={"cache-control": "max-age=x"})
    assert bad_cache.status_code == 400
    assert bad_cache.json()["error"]["param"] == "Cache-Control"
    unknown = await client.post(url, json=chat("no-such-model"))
    assert unknown.status_code == 404
    assert unknown.json()["error"]["param"] == "model"
    assert len(submitted) == 3


async def test_other_queries_long_keys_and_keys_on_direct_calls_go_to_the_route(
    client: httpx.AsyncClient, answered: list[str], submitted: list[str | None]
) -> None:
    spelled = await client.post("/v1/chat/completions?async=1", json=chat("mock"))
    assert spelled.status_code == 202, spelled.text
    too_long = await client.post(
        "/v1/chat/completions?async=true", json=chat("mock"), headers={"idempotency-key": "k" * 256}
    )
    assert too_long.status_code == 400
    direct = await client.post(
        "/v1/chat/completions", json=chat("mock"), headers={"idempotency-key": "k-2"}
    )
    assert direct.status_code == 200, direct.text
    assert answered == [] and submitted == []


async def test_invalid_bodies_go_to_the_route(
    client: httpx.AsyncClient, answered: list[str], submitted: list[str | None]
) -> None:
    invalid = await client.post("/v1/chat/completions", json=chat("mock", temperature=7))
    assert invalid.status_code == 400
    assert invalid.json()["error"]["param"] == "temperature"
    broken = await client.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert broken.status_code == 400
    assert broken.json()["error"]["code"] == "json_parse_error"
    job = await client.post("/v1/chat/completions?async=true", json=chat("mock", temperature=7))
    assert job.status_code == 400
    assert job.json()["error"]["param"] == "temperature"
    assert answered == [] and submitted == []


async def test_fast_path_errors_have_the_routes_shape(
    client: httpx.AsyncClient, answered: list[str]
) -> None:
    unknown = await client.post("/v1/chat/completions", json=chat("no-such-model"))
    assert unknown.status_code == 404
    assert unknown.json()["error"]["param"] == "model"
    anonymous = await client.post(
        "/v1/chat/completions", json=chat("mock"), headers={"authorization": ""}
    )
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["type"] == "authentication_error"
    bad_cache = await client.post(
        "/v1/chat/completions", json=chat("mock"), headers={"cache-control": "max-age=soon"}
    )
    assert bad_cache.status_code == 400
    assert bad_cache.json()["error"]["param"] == "Cache-Control"
    # The fast path answered the unknown model and the bad header itself (the call refused
    # both); the missing key was refused before any call.
    assert answered == ["no-such-model", "mock"]


async def test_a_missing_key_is_the_same_401_on_the_fast_path_and_on_the_route(
    client: httpx.AsyncClient,
) -> None:
    anonymous = {"authorization": "", "x-request-id": "anon-1"}
    url = "/v1/chat/completions"
    fast = await client.post(f"{url}?async=true", json=chat("mock"), headers=anonymous)
    # `async=1` is the route's to read: the stack answers it.
    routed = await client.post(f"{url}?async=1", json=chat("mock"), headers=anonymous)
    assert fast.status_code == routed.status_code == 401
    assert fast.json() == routed.json()
    assert fast.json()["error"]["message"].startswith("API key required")
    assert fast.headers["x-request-id"] == routed.headers["x-request-id"] == "anon-1"


async def test_a_body_over_the_limit_is_413_on_the_fast_path(client: httpx.AsyncClient) -> None:
    async def chunks() -> Any:
        for _ in range(20):
            yield b" " * 1024 * 1024  # no Content-Length: the limit applies while reading

    response = await client.post(
        "/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


async def test_a_declared_body_over_the_limit_is_413_before_it_is_read(
    client: httpx.AsyncClient, services: Services, answered: list[str]
) -> None:
    limit = services.settings.MAX_REQUEST_BYTES
    response = await client.post(
        "/v1/chat/completions",
        content=b" " * (limit + 1),
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    assert answered == []


async def test_the_fast_path_echoes_a_sane_request_id_and_replaces_an_unsafe_one(
    client: httpx.AsyncClient, answered: list[str]
) -> None:
    kept = await client.post(
        "/v1/chat/completions", json=chat("mock"), headers={"x-request-id": "trace-42.a_b"}
    )
    assert kept.headers["x-request-id"] == "trace-42.a_b"
    replaced = await client.post(
        "/v1/chat/completions", json=chat("mock"), headers={"x-request-id": "bad id <x>"}
    )
    assert replaced.headers["x-request-id"].startswith("req_")
    assert answered == ["mock", "mock"]


async def test_the_fast_path_takes_the_key_from_x_api_key(
    client: httpx.AsyncClient, answered: list[str]
) -> None:
    response = await client.post(
        "/v1/chat/completions",
        json=chat("mock"),
        headers={"authorization": "", "x-api-key": ADMIN},
    )
    assert response.status_code == 200, response.text
    assert answered == ["mock"]


async def test_a_bug_on_the_fast_path_is_a_logged_500_carrying_the_request_id(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(fastpath, "answer_directly", broken)
    response = await client.post(
        "/v1/chat/completions", json=chat("mock"), headers={"x-request-id": "req-bug-1"}
    )
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "api_error" and error["code"] == "internal_error"
    assert "req-bug-1" in error["message"]
    assert response.headers["x-request-id"] == "req-bug-1"
    logged = [r for r in caplog.records if r.exc_info and "req-bug-1" in r.getMessage()]
    assert len(logged) == 1


def slow_route_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Makes every route read take 20 ms; the list of the names read."""
    reads: list[str] = []
    original = ChatService._load_route

    async def slow_load(self: ChatService, name: str) -> tuple[Route, ModelKind]:
        reads.append(name)
        await asyncio.sleep(0.02)
        return await original(self, name)

    monkeypatch.setattr(ChatService, "_load_route", slow_load)
    return reads


async def test_concurrent_calls_after_the_route_expired_share_one_read(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    chat_service = services.chat
    reads = slow_route_reads(monkeypatch)
    chat_service.invalidate()
    routes = await asyncio.gather(*(chat_service.resolve("mock") for _ in range(20)))
    assert len(reads) == 1
    assert {route.name for route in routes} == {"mock"}


async def test_a_route_read_during_an_invalidation_is_not_kept(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    chat_service = services.chat
    reads = slow_route_reads(monkeypatch)
    chat_service.invalidate()
    first = asyncio.ensure_future(chat_service.resolve("mock"))
    await asyncio.sleep(0.005)
    chat_service.invalidate("mock")  # the model changed while it was being read
    await first
    await chat_service.resolve("mock")
    assert len(reads) == 2


async def test_an_expired_route_is_served_while_it_reloads_and_dropped_when_gone(
    services: Services, storage_of_app: Any
) -> None:
    chat_service = services.chat
    now = [1000.0]
    chat_service._routes.clock = lambda: now[0]
    chat_service.invalidate()
    lifetime = services.settings.ROUTE_CACHE_SECONDS
    await chat_service.resolve("mock")
    # Disabled behind this process's back (as another process would).
    async with storage_of_app.unit_of_work() as uow:
        model = await uow.repo(Model).get("mock")
        assert model is not None
        model.enabled = False
        await uow.repo(Model).update(model)
        await uow.commit()
    now[0] += lifetime + 0.1  # expired less than a lifetime ago
    await chat_service.resolve("mock")  # the old route answers; a reload starts
    await asyncio.sleep(0.05)
    with pytest.raises(NotFound):
        await chat_service.resolve("mock")


@pytest.fixture
def polled(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, float]]:
    """The operation ids and waits of the polls the fast path answered itself."""
    calls: list[tuple[str, float]] = []
    original = fastpath.poll_response

    async def recording(
        operations: Any, principal: Any, operation_id: str, wait: float, *, max_wait: float
    ) -> Any:
        calls.append((operation_id, wait))
        return await original(operations, principal, operation_id, wait, max_wait=max_wait)

    monkeypatch.setattr(fastpath, "poll_response", recording)
    return calls


async def test_a_poll_is_answered_by_the_fast_path_as_the_route_answers_it(
    client: httpx.AsyncClient, polled: list[tuple[str, float]]
) -> None:
    submitted = await client.post("/v1/chat/completions?async=true", json=chat("mock"))
    op_id = submitted.json()["operation_id"]
    plain = await client.get(f"/v1/operations/{op_id}", headers={"x-request-id": "poll-1"})
    assert plain.status_code == 200, plain.text
    assert plain.json()["id"] == op_id and plain.json()["status"] == "pending"
    assert plain.headers["x-request-id"] == "poll-1"
    waited = await client.get(f"/v1/operations/{op_id}?wait=0.05")
    assert waited.status_code == 200 and waited.json()["id"] == op_id
    unknown = await client.get("/v1/operations/op-00000000-0000-4000-8000-000000000000")
    assert unknown.status_code == 404
    assert unknown.json()["error"]["type"] == "not_found_error"
    malformed = await client.get("/v1/operations/not-an-id")
    assert malformed.status_code == 400
    anonymous = await client.get(f"/v1/operations/{op_id}", headers={"authorization": ""})
    assert anonymous.status_code == 401
    assert polled == [
        (op_id, 0.0),
        (op_id, 0.05),
        ("op-00000000-0000-4000-8000-000000000000", 0.0),
        ("not-an-id", 0.0),
    ]


async def test_polls_with_other_queries_go_to_the_route(
    client: httpx.AsyncClient, polled: list[tuple[str, float]]
) -> None:
    submitted = await client.post("/v1/chat/completions?async=true", json=chat("mock"))
    op_id = submitted.json()["operation_id"]
    negative = await client.get(f"/v1/operations/{op_id}?wait=-1")
    assert negative.status_code == 400
    assert negative.json()["error"]["param"] == "wait"
    spelled = await client.get(f"/v1/operations/{op_id}?wait=1e-2")
    assert spelled.status_code == 200 and spelled.json()["id"] == op_id
    extra = await client.get(f"/v1/operations/{op_id}?wait=0&verbose=1")
    assert extra.status_code == 200
    nested = await client.get(f"/v1/operations/{op_id}/children")
    assert nested.status_code == 404
    assert polled == []

"""Per-key permissions on every /v1 route: a key limited to model A gets 403 for model B."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import httpx
import pytest

from app.core.errors import PermissionDenied
from app.operations.entities import Operation
from app.operations.runner import JobContext
from app.operations.submit import Owner
from app.queue.names import OperationKind
from app.services import build_handlers
from tests.access.conftest import ADMIN, new_key, services_of


def chat(model: str, **message: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi", **message}]}


@pytest.fixture
async def second_model(client: httpx.AsyncClient) -> str:
    created = await client.post(
        "/admin/models",
        json={"id": "mock-b", "provider": "mock", "provider_model": "mock"},
        headers=ADMIN,
    )
    assert created.status_code == 201, created.text
    return "mock-b"


def assert_forbidden(response: httpx.Response, param: str, resource_id: str) -> None:
    assert response.status_code == 403, response.text
    error = response.json()["error"]
    assert error["type"] == "permission_error" and error["param"] == param
    assert resource_id in error["message"]


async def test_chat_is_limited_to_the_keys_models(
    client: httpx.AsyncClient, second_model: str
) -> None:
    _, only_mock = await new_key(client, permissions={"models": ["mock"]})
    allowed = await client.post("/v1/chat/completions", json=chat("mock"), headers=only_mock)
    assert allowed.status_code == 200, allowed.text
    refused = await client.post("/v1/chat/completions", json=chat(second_model), headers=only_mock)
    assert_forbidden(refused, "model", second_model)
    as_job = await client.post(
        "/v1/chat/completions?async=true", json=chat(second_model), headers=only_mock
    )
    assert_forbidden(as_job, "model", second_model)
    streamed = await client.post(
        "/v1/chat/completions", json={**chat(second_model), "stream": True}, headers=only_mock
    )
    assert_forbidden(streamed, "model", second_model)


async def test_a_key_with_no_models_and_an_admin_key(
    client: httpx.AsyncClient, second_model: str
) -> None:
    _, none = await new_key(client, permissions={"models": "none"})
    for path, body in (
        ("/v1/chat/completions", chat("mock")),
        ("/v1/embeddings", {"model": "mock", "input": "hi"}),
    ):
        assert_forbidden(await client.post(path, json=body, headers=none), "model", "mock")
    _, admin_limited = await new_key(client, permissions={"admin": True, "models": "none"})
    ok = await client.post("/v1/chat/completions", json=chat(second_model), headers=admin_limited)
    assert ok.status_code == 200


async def test_prompts_referenced_in_messages_are_checked(client: httpx.AsyncClient) -> None:
    _, headers = await new_key(client, permissions={"prompts": ["greeting"]})
    refused = await client.post(
        "/v1/chat/completions", json=chat("mock", prompt_id="secret-prompt"), headers=headers
    )
    assert_forbidden(refused, "messages.0.prompt_id", "secret-prompt")


async def test_models_are_listed_and_retrieved_per_key(
    client: httpx.AsyncClient, second_model: str
) -> None:
    _, only_mock = await new_key(client, permissions={"models": ["mock"]})
    listed = await client.get("/v1/models", headers=only_mock)
    assert [m["id"] for m in listed.json()["data"]] == ["mock"]
    _, every = await new_key(client)
    everything = await client.get("/v1/models", headers=every)
    assert {"mock", second_model} <= {m["id"] for m in everything.json()["data"]}
    assert (await client.get("/v1/models/mock", headers=only_mock)).status_code == 200
    assert_forbidden(
        await client.get(f"/v1/models/{second_model}", headers=only_mock), "model", second_model
    )
    assert (await client.get("/v1/models/no-such-model", headers=only_mock)).status_code == 404


@dataclass
class FakeContext:
    operation: Operation
    attempt: int = 1
    writes: list[Any] = field(default_factory=list)

    async def checkpoint(self) -> None:
        return None

    def write_with_outcome(self, write: Any) -> None:
        self.writes.append(write)

    def add_with_outcome(self, rows: Any, then: Any = None) -> None:
        self.writes.append((rows, then))


async def test_a_queued_call_is_checked_against_the_key_when_it_runs(
    client: httpx.AsyncClient,
) -> None:
    key_id, headers = await new_key(client, permissions={"models": ["mock"]})
    accepted = await client.post(
        "/v1/chat/completions?async=true", json=chat("mock"), headers=headers
    )
    assert accepted.status_code == 202
    services = services_of(client)
    operation = await services.operations.get(
        accepted.json()["operation_id"], owner=Owner(key_id=None, admin=True)
    )
    run = build_handlers(services)[OperationKind.CHAT_COMPLETION]
    context = cast(JobContext, FakeContext(operation))
    assert isinstance(await run(context), dict)  # allowed when submitted and when run
    await client.patch(
        f"/admin/keys/{key_id}", json={"permissions": {"models": "none"}}, headers=ADMIN
    )
    with pytest.raises(PermissionDenied, match="mock"):
        await run(context)
    await client.post(f"/admin/keys/{key_id}/revoke", headers=ADMIN)
    with pytest.raises(PermissionDenied, match="revoked"):
        await run(context)

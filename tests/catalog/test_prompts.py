"""Prompts: versions, labels, pruning, rendering over HTTP, and chat-message expansion."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from app.core.errors import Conflict, InvalidInput, NotFound
from app.prompts.schemas import PromptUpdate
from app.services import Services
from tests.catalog.conftest import user_headers


async def add_prompt(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {"id": "greet", "content": "Hello ${var:name:there}!"}
    payload.update(body)
    response = await client.post("/admin/prompts", json=payload)
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


async def edit(client: httpx.AsyncClient, prompt_id: str, **body: Any) -> dict[str, Any]:
    response = await client.patch(f"/admin/prompts/{prompt_id}", json=body)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


async def kept_versions(client: httpx.AsyncClient, prompt_id: str) -> list[int]:
    body = (await client.get(f"/admin/prompts/{prompt_id}/versions?limit=100")).json()
    return sorted(v["version"] for v in body["data"])


async def render(client: httpx.AsyncClient, prompt_id: str, **body: Any) -> httpx.Response:
    return await client.post(f"/admin/prompts/{prompt_id}/render", json=body)


async def test_a_new_prompt_is_version_1_labelled_latest_with_its_variables(
    client: httpx.AsyncClient,
) -> None:
    body = await add_prompt(
        client, content="${var:a} ${var:b-c:x} ${var:d_e:}", labels=["production"]
    )
    assert body["current_version"] == 1
    assert body["labels"] == {"latest": 1, "production": 1}
    assert body["variables"] == [
        {"name": "a", "required": True, "default": None},
        {"name": "b-c", "required": False, "default": "x"},
        {"name": "d_e", "required": False, "default": ""},
    ]


async def test_a_malformed_placeholder_is_refused_on_save(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/admin/prompts", json={"id": "bad", "content": "Hi ${var:first name}"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "content"


async def test_new_content_adds_a_version_and_old_versions_stay_unchanged(
    client: httpx.AsyncClient,
) -> None:
    await add_prompt(client, labels=["production"])
    updated = await edit(client, "greet", content="Hi ${var:name}", message="shorter")
    assert updated["current_version"] == 2
    assert updated["labels"] == {"latest": 2, "production": 1}
    same = await edit(client, "greet", content="Hi ${var:name}", description="no new version")
    assert same["current_version"] == 2
    old = (await client.get("/admin/prompts/greet/versions/1")).json()
    assert old["content"] == "Hello ${var:name:there}!" and old["labels"] == ["production"]
    new = (await client.get("/admin/prompts/greet/versions/2")).json()
    assert new["message"] == "shorter" and new["labels"] == ["latest"]
    assert (await client.get("/admin/prompts/greet/versions/9")).status_code == 404


async def test_rendering_uses_production_then_a_label_or_a_version(
    client: httpx.AsyncClient,
) -> None:
    await add_prompt(client, content="v1 ${var:name}", labels=["production"])
    await edit(client, "greet", content="v2 ${var:name}", labels=["staging"])
    await edit(client, "greet", content="v3 ${var:name}")
    variables = {"name": "Ann"}

    default = (await render(client, "greet", variables=variables)).json()
    assert default == {"prompt_id": "greet", "version": 1, "rendered": "v1 Ann"}
    by_label = (await render(client, "greet", variables=variables, label="staging")).json()
    assert by_label["rendered"] == "v2 Ann"
    latest = (await render(client, "greet", variables=variables, label="latest")).json()
    assert latest["rendered"] == "v3 Ann"
    by_number = (await render(client, "greet", variables=variables, version=2)).json()
    assert by_number["version"] == 2
    both = await render(client, "greet", variables=variables, label="latest", version=1)
    assert both.status_code == 400
    unknown_label = await render(client, "greet", variables=variables, label="nope")
    assert unknown_label.status_code == 404


async def test_without_a_production_label_rendering_uses_the_newest(
    client: httpx.AsyncClient,
) -> None:
    await add_prompt(client, content="v1")
    await edit(client, "greet", content="v2")
    assert (await render(client, "greet")).json()["rendered"] == "v2"


async def test_a_missing_variable_is_400_naming_it(client: httpx.AsyncClient) -> None:
    await add_prompt(client, content="${var:topic} for ${var:max-words:10} words")
    response = await render(client, "greet", variables={"max-words": 5})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "variables.topic" and "'topic'" in error["message"]


async def test_variable_values_may_be_numbers_or_booleans_but_not_objects(
    client: httpx.AsyncClient,
) -> None:
    await add_prompt(client, content="${var:n} ${var:flag} ${var:x:dflt}")
    ok = await render(client, "greet", variables={"n": 3, "flag": True, "x": None})
    assert ok.json()["rendered"] == "3 true dflt"
    refused = await render(client, "greet", variables={"n": {"a": 1}, "flag": 1})
    assert refused.status_code == 400
    assert refused.json()["error"]["param"].startswith("variables.n")


async def test_labels_move_and_latest_always_follows_the_newest(
    client: httpx.AsyncClient,
) -> None:
    await add_prompt(client)
    await edit(client, "greet", content="two")
    moved = await client.put("/admin/prompts/greet/labels/production", json={"version": 1})
    assert moved.json()["labels"] == {"latest": 2, "production": 1}
    moved = await client.put("/admin/prompts/greet/labels/production", json={"version": 2})
    assert moved.json()["labels"]["production"] == 2
    pinned = await client.put("/admin/prompts/greet/labels/latest", json={"version": 1})
    assert pinned.status_code == 400
    nowhere = await client.put("/admin/prompts/greet/labels/canary", json={"version": 7})
    assert nowhere.status_code == 404
    bad_name = await client.put("/admin/prompts/greet/labels/bad%20label", json={"version": 1})
    assert bad_name.status_code == 400
    removed = await client.delete("/admin/prompts/greet/labels/production")
    assert removed.json()["labels"] == {"latest": 2}
    assert (await client.delete("/admin/prompts/greet/labels/latest")).status_code == 400
    assert (await client.delete("/admin/prompts/greet/labels/production")).status_code == 404


async def test_max_history_prunes_the_oldest_unlabelled_versions(
    client: httpx.AsyncClient,
) -> None:
    await add_prompt(client, content="v1", max_history=3, labels=["production"])
    for n in range(2, 7):
        await edit(client, "greet", content=f"v{n}")
    # v1 is held by `production`; the newest ones fill the rest of the budget.
    assert await kept_versions(client, "greet") == [1, 5, 6]
    await client.delete("/admin/prompts/greet/labels/production")
    await edit(client, "greet", content="v7")
    assert await kept_versions(client, "greet") == [5, 6, 7]


async def test_labelled_versions_survive_even_beyond_max_history(
    client: httpx.AsyncClient,
) -> None:
    await add_prompt(client, content="v1", max_history=1, labels=["a"])
    await edit(client, "greet", content="v2", labels=["b"])
    await edit(client, "greet", content="v3")
    assert await kept_versions(client, "greet") == [1, 2, 3]


async def test_max_history_zero_keeps_everything(client: httpx.AsyncClient) -> None:
    await add_prompt(client, content="v1", max_history=0)
    for n in range(2, 13):
        await edit(client, "greet", content=f"v{n}")
    assert await kept_versions(client, "greet") == list(range(1, 13))


async def test_restore_saves_an_old_version_as_the_newest(client: httpx.AsyncClient) -> None:
    await add_prompt(client, content="first")
    await edit(client, "greet", content="second")
    restored = await client.post("/admin/prompts/greet/versions/1/restore")
    assert restored.json()["current_version"] == 3 and restored.json()["content"] == "first"


async def test_deleting_a_prompt_removes_its_versions(client: httpx.AsyncClient) -> None:
    await add_prompt(client)
    assert (await client.delete("/admin/prompts/greet")).json()["deleted"] is True
    assert (await client.get("/admin/prompts/greet")).status_code == 404
    assert (await client.get("/admin/prompts/greet/versions")).status_code == 404
    await add_prompt(client, content="again")
    assert await kept_versions(client, "greet") == [1]


async def test_a_duplicate_prompt_is_409(client: httpx.AsyncClient) -> None:
    await add_prompt(client)
    response = await client.post("/admin/prompts", json={"id": "greet", "content": "x"})
    assert response.status_code == 409


async def test_expand_messages_renders_prompt_references(
    client: httpx.AsyncClient, services: Services
) -> None:
    await add_prompt(client, content="You help with ${var:topic}.", labels=["production"])
    await edit(client, "greet", content="NEW ${var:topic}")
    messages: list[dict[str, Any]] = [
        {"role": "system", "prompt_id": "greet", "variables": {"topic": "tax"}},
        {"role": "user", "content": "hi", "name": "ann"},
        {
            "role": "user",
            "prompt_id": "greet",
            "prompt_label": "latest",
            "variables": {"topic": "x"},
        },
        {"role": "user", "prompt_id": "greet", "prompt_version": 1, "variables": {"topic": "y"}},
    ]
    expanded = await services.prompts.expand_messages(messages)
    assert expanded == [
        {"role": "system", "content": "You help with tax."},
        {"role": "user", "content": "hi", "name": "ann"},
        {"role": "user", "content": "NEW x"},
        {"role": "user", "content": "You help with y."},
    ]


async def test_expand_messages_without_references_returns_them_unchanged(
    services: Services,
) -> None:
    messages = [{"role": "user", "content": "hi"}]
    assert await services.prompts.expand_messages(messages) == messages


async def test_expand_messages_unknown_or_disabled_prompt_is_404_on_messages(
    client: httpx.AsyncClient, services: Services
) -> None:
    await add_prompt(client, enabled=False)
    for prompt_id in ("nope", "greet"):
        with pytest.raises(NotFound) as caught:
            await services.prompts.expand_messages([{"role": "user", "prompt_id": prompt_id}])
        assert caught.value.param == "messages"
        assert prompt_id in caught.value.message


async def test_expand_messages_missing_variable_or_bad_reference_is_400(
    client: httpx.AsyncClient, services: Services
) -> None:
    await add_prompt(client, content="${var:topic}")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"role": "user", "prompt_id": "greet"}, "messages.0.variables.topic"),
        ({"role": "user", "prompt_id": "greet", "variables": []}, "messages.0.variables"),
        (
            {"role": "user", "prompt_id": "greet", "prompt_version": "1"},
            "messages.0.prompt_version",
        ),
        ({"role": "user", "prompt_id": "greet", "content": "x"}, "messages.0.content"),
    ]
    for message, param in cases:
        with pytest.raises(InvalidInput) as caught:
            await services.prompts.expand_messages([message])
        assert caught.value.param == param, message
    with pytest.raises(InvalidInput, match="'topic'"):
        await services.prompts.expand_messages([{"role": "user", "prompt_id": "greet"}])


async def test_concurrent_edits_of_one_prompt_never_share_a_version_number(
    client: httpx.AsyncClient, services: Services
) -> None:
    await add_prompt(client, content="v1")
    results = await asyncio.gather(
        *(services.prompts.update("greet", PromptUpdate(content=f"edit {n}")) for n in range(4)),
        return_exceptions=True,
    )
    succeeded = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, BaseException)]
    assert succeeded and all(isinstance(r, Conflict) for r in refused)
    kept = await kept_versions(client, "greet")
    assert kept == list(range(1, len(succeeded) + 2))


async def test_a_chat_request_can_reference_a_stored_prompt(
    client: httpx.AsyncClient, services: Services
) -> None:
    await add_prompt(client, content="Say ${var:word}", labels=["production"])
    headers = await user_headers(services)
    messages = [{"role": "user", "prompt_id": "greet", "variables": {"word": "pineapple"}}]
    answer = await client.post(
        "/v1/chat/completions", json={"model": "mock", "messages": messages}, headers=headers
    )
    assert answer.status_code == 200, answer.text
    assert "pineapple" in answer.json()["choices"][0]["message"]["content"]
    missing = await client.post(
        "/v1/chat/completions",
        json={"model": "mock", "messages": [{"role": "user", "prompt_id": "greet"}]},
        headers=headers,
    )
    assert missing.status_code == 400 and "'word'" in missing.json()["error"]["message"]
    unknown = await client.post(
        "/v1/chat/completions",
        json={"model": "mock", "messages": [{"role": "user", "prompt_id": "nope"}]},
        headers=headers,
    )
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "messages"

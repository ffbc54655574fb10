"""Models: admin CRUD, config_version, and the OpenAI-shaped `/v1/models`."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from app.access.permissions import KeyPermissions
from app.core.errors import NotFound
from app.credentials.entities import Provider
from app.gateway.schemas import ChainCreate, ChainStep
from app.models.schemas import ModelCreate, ModelUpdate
from app.models.service import ModelNotFound, ModelService
from app.services import Services
from tests.catalog.conftest import user_headers


async def add_credential(client: httpx.AsyncClient, credential_id: str, provider: str) -> None:
    body = {"id": credential_id, "provider": provider, "secret": "sk-x"}
    assert (await client.post("/admin/credentials", json=body)).status_code == 201


async def add_model(client: httpx.AsyncClient, **body: Any) -> httpx.Response:
    payload: dict[str, Any] = {"id": "m-1", "provider": "mock", "provider_model": "mock"}
    payload.update(body)
    return await client.post("/admin/models", json=payload)


async def test_a_created_model_has_every_field_and_version_1(client: httpx.AsyncClient) -> None:
    await add_credential(client, "oa", "openai")
    response = await add_model(
        client,
        id="gpt-4o-mini",
        provider="openai",
        provider_model="gpt-4o-mini-2024-07-18",
        credential_id="oa",
        parameters={"temperature": 0.2, "seed_hint": "kept"},
        context_window=128000,
        input_price_per_million="0.15",
        output_price_per_million=0.6,
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["name"] == "gpt-4o-mini" and body["enabled"] is True
    assert body["parameters"] == {"temperature": 0.2, "seed_hint": "kept"}
    assert body["input_price_per_million"] == 0.15 and body["output_price_per_million"] == 0.6
    assert body["config_version"] == 1
    fetched = await client.get("/admin/models/gpt-4o-mini")
    assert fetched.json() == body


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"id": "Not a slug!"}, "id"),
        ({"id": "-lead"}, "id"),
        ({"provider": "openai"}, "credential_id"),
        ({"credential_id": "missing"}, "credential_id"),
        ({"parameters": {"temperature": 2.5}}, "parameters.temperature"),
        ({"parameters": {"base_url": "https://u:p@proxy.example/v1"}}, "parameters.base_url"),
        ({"parameters": {"base_url": "proxy.example"}}, "parameters.base_url"),
        ({"input_price_per_million": -1}, "input_price_per_million"),
        ({"context_window": 0}, "context_window"),
        ({"unknown": 1}, "unknown"),
    ],
)
async def test_invalid_models_are_400_naming_the_field(
    client: httpx.AsyncClient, body: dict[str, Any], param: str
) -> None:
    response = await add_model(client, **body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


async def test_url_credentials_in_base_url_are_refused_on_update_naming_the_field(
    client: httpx.AsyncClient,
) -> None:
    assert (await add_model(client, parameters={"base_url": "https://proxy.example"})).is_success
    changed = await client.patch(
        "/admin/models/m-1", json={"parameters": {"base_url": "https://key@proxy.example/v1"}}
    )
    assert changed.status_code == 400, changed.text
    error = changed.json()["error"]
    assert error["param"] == "parameters.base_url"
    assert "not in the endpoint URL" in error["message"] and "key@" not in changed.text
    kept = (await client.get("/admin/models/m-1")).json()
    assert kept["parameters"]["base_url"] == "https://proxy.example"


@pytest.mark.parametrize("name", ["gpt-4.1-mini", "llama3.1:8b", "claude_3_5"])
async def test_model_ids_may_be_spelled_as_providers_spell_them(
    client: httpx.AsyncClient, name: str
) -> None:
    response = await add_model(client, id=name)
    assert response.status_code == 201, response.text
    assert (await client.get(f"/admin/models/{name}")).status_code == 200


async def test_a_credential_of_another_provider_is_refused(client: httpx.AsyncClient) -> None:
    await add_credential(client, "anth", "anthropic")
    response = await add_model(
        client, provider="openai", provider_model="gpt-4o", credential_id="anth"
    )
    assert response.status_code == 400
    assert "anthropic" in response.json()["error"]["message"]


async def test_a_duplicate_id_is_409(client: httpx.AsyncClient) -> None:
    await add_model(client)
    assert (await add_model(client)).status_code == 409


async def test_config_version_moves_only_when_answers_can_change(
    client: httpx.AsyncClient,
) -> None:
    await add_credential(client, "mock-cred", "mock")
    await add_model(client, parameters={"temperature": 0.5})

    async def patch(**body: Any) -> int:
        response = await client.patch("/admin/models/m-1", json=body)
        assert response.status_code == 200, response.text
        return int(response.json()["config_version"])

    assert await patch(name="Renamed", input_price_per_million=1, enabled=False) == 1
    assert await patch(parameters={"temperature": 0.5}) == 1  # the same values
    assert await patch(parameters={"temperature": 0.7}) == 2
    assert await patch(provider_model="mock-v2") == 3
    assert await patch(credential_id="mock-cred") == 4
    assert await patch(credential_id=None) == 5


async def test_update_refuses_null_for_required_fields_and_unknown_models(
    client: httpx.AsyncClient,
) -> None:
    await add_model(client)
    refused = await client.patch("/admin/models/m-1", json={"provider_model": None})
    assert refused.status_code == 400
    missing = await client.patch("/admin/models/nope", json={"name": "x"})
    assert missing.status_code == 404


async def test_admin_listing_filters_and_pages(client: httpx.AsyncClient) -> None:
    for n in range(3):
        await add_model(client, id=f"m-{n}", enabled=n != 1)
    disabled = (await client.get("/admin/models?enabled=false")).json()
    assert [m["id"] for m in disabled["data"]] == ["m-1"]
    first = (await client.get("/admin/models?limit=2")).json()
    rest = (await client.get(f"/admin/models?limit=2&after={first['next_cursor']}")).json()
    ids = [m["id"] for m in first["data"] + rest["data"]]
    assert ids[:3] == ["m-0", "m-1", "m-2"] and len(set(ids)) == 4


async def test_v1_models_lists_enabled_models_in_openai_shape(
    client: httpx.AsyncClient, services: Services
) -> None:
    await add_model(client, id="on")
    await add_model(client, id="off", enabled=False)
    headers = await user_headers(services)
    response = await client.get("/v1/models", headers=headers)
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    ids = [m["id"] for m in body["data"]]
    assert "on" in ids and "off" not in ids and "mock" in ids
    assert ids == sorted(ids)
    for item in body["data"]:
        assert set(item) == {"id", "object", "created", "owned_by"}
        assert item["object"] == "model" and isinstance(item["created"], int)
        assert item["owned_by"] == "mock"


async def test_v1_model_retrieve_and_its_404s(
    client: httpx.AsyncClient, services: Services
) -> None:
    await add_model(client, id="on")
    await add_model(client, id="off", enabled=False)
    headers = await user_headers(services)
    found = await client.get("/v1/models/on", headers=headers)
    assert found.status_code == 200 and found.json()["id"] == "on"
    for missing in ("off", "never-heard-of", "bad id!"):
        response = await client.get(f"/v1/models/{missing}", headers=headers)
        assert response.status_code == 404, missing
        error = response.json()["error"]
        assert error["type"] == "not_found_error" and error["code"] == "model_not_found"
        assert error["param"] == "model"


async def test_v1_models_needs_a_key(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/models", headers={"Authorization": "Bearer wrong"})
    assert response.status_code == 401


async def test_admin_model_routes_need_admin_rights(
    client: httpx.AsyncClient, services: Services
) -> None:
    headers = await user_headers(services)
    assert (await client.get("/admin/models", headers=headers)).status_code == 403
    assert (await client.delete("/admin/models/mock", headers=headers)).status_code == 403


async def test_get_enabled_raises_model_not_found(services: Services) -> None:
    with pytest.raises(ModelNotFound):
        await services.models.get_enabled("nope")
    with pytest.raises(NotFound):
        await services.models.get("nope")


async def test_moving_a_credential_to_another_endpoint_moves_its_models_config_version(
    client: httpx.AsyncClient,
) -> None:
    await add_credential(client, "oa", "openai")
    await add_model(client, provider="openai", provider_model="gpt-4o", credential_id="oa")
    await client.patch("/admin/credentials/oa", json={"secret": "sk-rotated", "name": "n"})
    assert (await client.get("/admin/models/m-1")).json()["config_version"] == 1
    await client.patch("/admin/credentials/oa", json={"endpoint": "https://vllm.example/v1"})
    assert (await client.get("/admin/models/m-1")).json()["config_version"] == 2


async def test_every_model_change_is_announced_after_commit(services: Services) -> None:
    changed: list[str | None] = []
    models = ModelService(services.storage, on_change=changed.append)
    await models.create(ModelCreate(id="tell", provider=Provider.MOCK, provider_model="mock"))
    await models.update("tell", ModelUpdate(enabled=False))
    await models.delete("tell")
    assert changed == ["tell", "tell", "tell"]
    with pytest.raises(NotFound):
        await models.update("tell", ModelUpdate(enabled=True))
    assert len(changed) == 3


async def test_a_disabled_model_stops_answering_chat_at_once(
    client: httpx.AsyncClient, services: Services
) -> None:
    await add_model(client, id="soon-off")
    headers = await user_headers(services)
    chat = {"model": "soon-off", "messages": [{"role": "user", "content": "hi"}]}
    assert (
        await client.post("/v1/chat/completions", json=chat, headers=headers)
    ).status_code == 200
    await client.patch("/admin/models/soon-off", json={"enabled": False})
    refused = await client.post("/v1/chat/completions", json=chat, headers=headers)
    assert refused.status_code == 404


async def test_models_and_chains_never_share_a_name_and_a_chained_model_stays(
    client: httpx.AsyncClient, services: Services
) -> None:
    await add_model(client, id="step-one")
    await services.chains.create(
        ChainCreate(id="duo", name="Duo", steps=[ChainStep(model_id="step-one")])
    )
    clash = await add_model(client, id="duo")
    assert clash.status_code == 409 and "chain" in clash.json()["error"]["message"]
    refused = await client.delete("/admin/models/step-one")
    assert refused.status_code == 409 and "'duo'" in refused.json()["error"]["message"]


async def add_chain(client: httpx.AsyncClient, chain_id: str, *steps: str, **body: Any) -> None:
    payload = {"id": chain_id, "name": chain_id, "steps": [{"model_id": s} for s in steps]}
    response = await client.post("/admin/chains", json={**payload, **body})
    assert response.status_code == 201, response.text


async def test_v1_models_lists_the_chains_a_call_can_go_through_beside_the_models(
    client: httpx.AsyncClient, services: Services
) -> None:
    await add_model(client, id="step-on")
    await add_model(client, id="step-off", enabled=False)
    await add_chain(client, "duo", "step-off", "step-on")
    await add_chain(client, "resting", "step-on", enabled=False)
    await add_chain(client, "nowhere", "step-off")  # its only model is disabled
    response = await client.get("/v1/models", headers=await user_headers(services))
    assert response.status_code == 200
    body = response.json()
    ids = [m["id"] for m in body["data"]]
    assert "duo" in ids and "step-on" in ids
    assert not {"resting", "nowhere", "step-off"} & set(ids)
    assert ids == sorted(ids) and len(ids) == len(set(ids))
    (duo,) = [m for m in body["data"] if m["id"] == "duo"]
    assert set(duo) == {"id", "object", "created", "owned_by"}
    assert duo["object"] == "model" and isinstance(duo["created"], int)
    assert duo["owned_by"] == "gateway"
    # The listed chain answers a chat call under the same name.
    call = {"model": "duo", "messages": [{"role": "user", "content": "hi"}]}
    answered = await client.post("/v1/chat/completions", json=call)
    assert answered.status_code == 200 and answered.json()["model"] == "step-on"


async def test_v1_models_lists_only_the_chains_the_key_may_call(
    client: httpx.AsyncClient, services: Services
) -> None:
    await add_model(client, id="step-on")
    await add_chain(client, "duo", "step-on")
    await add_chain(client, "trio", "step-on")
    only_duo = KeyPermissions(models=["duo"])
    _, secret = await services.keys.create_key(name="limited", permissions=only_duo)
    limited = {"Authorization": f"Bearer {secret}"}
    listed = await client.get("/v1/models", headers=limited)
    assert [m["id"] for m in listed.json()["data"]] == ["duo"]
    # The rule the chat route applies to the chain's name.
    trio = {"model": "trio", "messages": [{"role": "user", "content": "hi"}]}
    refused = await client.post("/v1/chat/completions", json=trio, headers=limited)
    assert refused.status_code == 403
    assert (await client.get("/v1/models/duo", headers=limited)).json()["owned_by"] == "gateway"
    assert (await client.get("/v1/models/trio", headers=limited)).status_code == 403


async def test_v1_model_retrieves_a_chain_and_404s_one_that_cannot_be_called(
    client: httpx.AsyncClient, services: Services
) -> None:
    await add_model(client, id="step-on")
    await add_model(client, id="step-off", enabled=False)
    await add_chain(client, "duo", "step-on")
    await add_chain(client, "resting", "step-on", enabled=False)
    await add_chain(client, "nowhere", "step-off")
    headers = await user_headers(services)
    found = await client.get("/v1/models/duo", headers=headers)
    assert found.status_code == 200 and found.json()["id"] == "duo"
    for missing in ("resting", "nowhere"):
        response = await client.get(f"/v1/models/{missing}", headers=headers)
        assert response.status_code == 404, missing
        assert response.json()["error"]["code"] == "model_not_found"

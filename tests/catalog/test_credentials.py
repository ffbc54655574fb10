"""Credentials: secrets encrypted and never shown or logged, in-use protection, connection test."""

from __future__ import annotations

import logging

import httpx
import pytest

from app.core.crypto import SecretBox
from app.core.errors import NotFound, Unavailable
from app.credentials.entities import Provider, StoredCredential
from app.credentials.schemas import CredentialCreate
from app.credentials.service import CredentialService
from app.services import Services
from tests.catalog.conftest import Upstream, user_headers

SECRET = "sk-test-0123456789-very-secret-value"


async def create(client: httpx.AsyncClient, **body: object) -> httpx.Response:
    payload: dict[str, object] = {"id": "openai-main", "provider": "openai", "secret": SECRET}
    payload.update(body)
    return await client.post("/admin/credentials", json=payload)


async def test_a_created_credential_shows_that_it_has_a_secret_but_never_the_secret(
    client: httpx.AsyncClient, services: Services
) -> None:
    created = await create(client)
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["has_secret"] is True and body["secret_source"] == "encrypted"
    assert "secret" not in body
    async with services.storage.unit_of_work() as uow:
        stored = await uow.repo(StoredCredential).get("openai-main")
    assert stored is not None and stored.secret_encrypted is not None
    assert SECRET not in stored.secret_encrypted


async def test_reveal_gives_the_decrypted_secret_to_the_chat_path(services: Services) -> None:
    await services.credentials.create(
        CredentialCreate.model_validate(
            {
                "id": "az",
                "provider": "azure_openai",
                "secret": SECRET,
                "endpoint": "https://example.openai.azure.com",
                "api_version": "2024-10-21",
            }
        )
    )
    revealed = await services.credentials.reveal("az")
    assert revealed.secret == SECRET
    assert revealed.provider is Provider.AZURE_OPENAI
    assert revealed.endpoint == "https://example.openai.azure.com"
    assert revealed.api_version == "2024-10-21"
    assert SECRET not in repr(revealed)
    with pytest.raises(NotFound):
        await services.credentials.reveal("missing")


async def test_an_env_var_credential_reads_its_secret_at_reveal_time(services: Services) -> None:
    box = SecretBox(["k"])
    environ = {"UPSTREAM_KEY": "from-the-environment"}
    credentials = CredentialService(
        services.storage, box, outbound=services.credentials._outbound, environ=environ
    )
    await credentials.create(
        CredentialCreate(id="env", provider=Provider.OPENAI, env_var="UPSTREAM_KEY")
    )
    assert (await credentials.reveal("env")).secret == "from-the-environment"
    environ.clear()
    assert (await credentials.reveal("env")).secret is None


async def test_a_disabled_credential_cannot_be_revealed(
    client: httpx.AsyncClient, services: Services
) -> None:
    await create(client, enabled=False)
    with pytest.raises(Unavailable):
        await services.credentials.reveal("openai-main")


async def test_secret_and_env_var_together_are_refused(client: httpx.AsyncClient) -> None:
    response = await create(client, env_var="OPENAI_API_KEY")
    assert response.status_code == 400
    assert SECRET not in response.text


async def test_bad_fields_are_400_naming_the_field(client: httpx.AsyncClient) -> None:
    cases = {
        "id": {"id": "has space"},
        "provider": {"provider": "nope"},
        "endpoint": {"endpoint": "ftp://x"},
        "header_value_template": {"header_value_template": "Bearer"},
        "api_key": {"api_key": "sk-typo-field"},
    }
    for field, body in cases.items():
        response = await create(client, **body)
        assert response.status_code == 400, (field, response.text)
        assert response.json()["error"]["param"] == field


async def test_a_duplicate_id_is_409(client: httpx.AsyncClient) -> None:
    await create(client)
    assert (await create(client)).status_code == 409


async def test_update_replaces_the_secret_and_switching_to_env_var_drops_it(
    client: httpx.AsyncClient, services: Services
) -> None:
    await create(client)
    changed = await client.patch("/admin/credentials/openai-main", json={"secret": "sk-new-1"})
    assert changed.status_code == 200 and "sk-new-1" not in changed.text
    assert (await services.credentials.reveal("openai-main")).secret == "sk-new-1"
    switched = await client.patch("/admin/credentials/openai-main", json={"env_var": "OA_KEY"})
    assert switched.json()["secret_source"] == "env_var"
    async with services.storage.unit_of_work() as uow:
        stored = await uow.repo(StoredCredential).get("openai-main")
    assert stored is not None and stored.secret_encrypted is None
    cleared = await client.patch("/admin/credentials/openai-main", json={"env_var": None})
    assert cleared.json()["has_secret"] is False


@pytest.mark.parametrize(
    "endpoint", ["https://user:hunter2@proxy.example/v1", "https://hunter2@proxy.example/v1"]
)
async def test_credentials_in_the_endpoint_url_are_refused_on_create_and_update(
    client: httpx.AsyncClient, services: Services, endpoint: str
) -> None:
    refused = await create(client, endpoint=endpoint)
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["param"] == "endpoint"
    assert "put credentials in the credential's secret" in error["message"]
    assert "hunter2" not in refused.text
    assert (await create(client, endpoint="https://proxy.example/v1")).status_code == 201
    changed = await client.patch("/admin/credentials/openai-main", json={"endpoint": endpoint})
    assert changed.status_code == 400, changed.text
    assert changed.json()["error"]["param"] == "endpoint"
    assert "hunter2" not in changed.text
    assert (await services.credentials.get("openai-main")).endpoint == "https://proxy.example/v1"


async def stored_with_url_credentials(services: Services) -> None:
    """A credential saved before URL credentials were refused (written past the API)."""
    await services.credentials.create(
        CredentialCreate(id="legacy", provider=Provider.OPENAI, secret=SECRET)
    )
    async with services.storage.unit_of_work() as uow:
        stored = await uow.repo(StoredCredential).get("legacy")
        assert stored is not None
        stored.endpoint = "https://user:hunter2@proxy.example/v1"
        await uow.repo(StoredCredential).update(stored)
        await uow.commit()


async def test_a_stored_endpoint_with_url_credentials_is_shown_masked(
    client: httpx.AsyncClient, services: Services
) -> None:
    await stored_with_url_credentials(services)
    shown = await client.get("/admin/credentials/legacy")
    assert shown.status_code == 200
    assert "hunter2" not in shown.text and "user" not in shown.json()["endpoint"]
    assert shown.json()["endpoint"] == "https://***@proxy.example/v1"


async def test_a_stored_endpoint_with_url_credentials_fails_calls_with_a_clear_error(
    client: httpx.AsyncClient, services: Services
) -> None:
    await stored_with_url_credentials(services)
    model = {"id": "via-legacy", "provider": "openai", "provider_model": "gpt-4o"}
    created = await client.post("/admin/models", json={**model, "credential_id": "legacy"})
    assert created.status_code == 201, created.text
    headers = await user_headers(services)
    chat = {"model": "via-legacy", "messages": [{"role": "user", "content": "hi"}]}
    for stream in (False, True):
        answer = await client.post(
            "/v1/chat/completions", json={**chat, "stream": stream}, headers=headers
        )
        assert answer.status_code == 503, answer.text
        message = answer.json()["error"]["message"]
        assert "the endpoint of credential 'legacy' carries a user name or password" in message
        assert "hunter2" not in answer.text
    tested = await client.post("/admin/credentials/legacy/test")
    assert tested.status_code == 400, tested.text
    assert tested.json()["error"]["param"] == "endpoint" and "hunter2" not in tested.text


async def test_listing_pages_through_credentials_by_id(client: httpx.AsyncClient) -> None:
    for n in range(3):
        await create(client, id=f"c{n}")
    first = (await client.get("/admin/credentials?limit=2")).json()
    assert [c["id"] for c in first["data"]] == ["c0", "c1"] and first["has_more"]
    rest = (await client.get(f"/admin/credentials?limit=2&after={first['next_cursor']}")).json()
    assert [c["id"] for c in rest["data"]] == ["c2"] and not rest["has_more"]


async def test_deleting_a_credential_used_by_a_model_is_409(client: httpx.AsyncClient) -> None:
    await create(client)
    model = {
        "id": "gpt-4o",
        "provider": "openai",
        "provider_model": "gpt-4o",
        "credential_id": "openai-main",
    }
    assert (await client.post("/admin/models", json=model)).status_code == 201
    refused = await client.delete("/admin/credentials/openai-main")
    assert refused.status_code == 409
    assert "gpt-4o" in refused.json()["error"]["message"]
    assert (await client.delete("/admin/models/gpt-4o")).status_code == 200
    deleted = await client.delete("/admin/credentials/openai-main")
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    assert (await client.get("/admin/credentials/openai-main")).status_code == 404


async def test_connection_test_calls_the_model_list_with_the_secret(
    client: httpx.AsyncClient, upstream: Upstream
) -> None:
    await create(client, endpoint=f"{upstream.url}/v1")
    result = await client.post("/admin/credentials/openai-main/test")
    assert result.status_code == 200
    body = result.json()
    assert body["ok"] is True and body["status_code"] == 200 and body["error"] is None
    assert body["latency_ms"] >= 0
    line, headers = upstream.requests[0]
    assert line.startswith("GET /v1/models ")
    assert headers["authorization"] == f"Bearer {SECRET}"


async def test_connection_test_uses_each_providers_way_of_authenticating(
    client: httpx.AsyncClient, upstream: Upstream
) -> None:
    await create(client, id="anth", provider="anthropic", endpoint=upstream.url)
    await create(client, id="azure", provider="azure_openai", endpoint=upstream.url)
    await create(
        client,
        id="custom-header",
        endpoint=upstream.url,
        header_name="X-Key",
        header_value_template="Token {secret}",
    )
    for credential_id in ("anth", "azure", "custom-header"):
        assert (await client.post(f"/admin/credentials/{credential_id}/test")).json()["ok"]
    (anth_line, anth), (azure_line, azure), (_, custom) = upstream.requests
    assert anth_line.startswith("GET /v1/models ") and anth["x-api-key"] == SECRET
    assert anth["anthropic-version"] == "2023-06-01"
    assert azure_line.startswith("GET /openai/models?api-version=") and azure["api-key"] == SECRET
    assert custom["x-key"] == f"Token {SECRET}" and "authorization" not in custom


async def test_a_rejected_credential_reports_the_status_without_echoing_the_secret(
    client: httpx.AsyncClient, upstream: Upstream
) -> None:
    upstream.status = 401
    upstream.body = f'{{"error": {{"message": "Incorrect API key provided: {SECRET}"}}}}'
    await create(client, endpoint=upstream.url)
    body = (await client.post("/admin/credentials/openai-main/test")).json()
    assert body["ok"] is False and body["status_code"] == 401
    assert "Incorrect API key" in body["error"] and SECRET not in body["error"]


async def test_a_slow_upstream_fails_the_test_after_the_timeout(
    client: httpx.AsyncClient, services: Services, upstream: Upstream
) -> None:
    upstream.delay = 1.0
    services.credentials._test_timeout = 0.2
    await create(client, endpoint=upstream.url)
    body = (await client.post("/admin/credentials/openai-main/test")).json()
    assert body["ok"] is False and body["status_code"] is None
    assert "0.2" in body["error"]


async def test_a_loopback_endpoint_is_refused_unless_the_operator_allows_it(
    client: httpx.AsyncClient, services: Services, upstream: Upstream
) -> None:
    from app.core.outbound import OutboundClient

    # Saved while the operator allowed loopback, tested after the allowance went away.
    assert (await create(client, endpoint=upstream.url)).status_code == 201
    services.credentials._outbound = OutboundClient()
    body = (await client.post("/admin/credentials/openai-main/test")).json()
    assert body["ok"] is False and "loopback" in body["error"]
    assert upstream.requests == []
    refused = await create(client, endpoint=upstream.url)
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["param"] == "endpoint"


async def test_a_mock_credential_always_tests_ok(client: httpx.AsyncClient) -> None:
    await client.post("/admin/credentials", json={"id": "m", "provider": "mock"})
    body = (await client.post("/admin/credentials/m/test")).json()
    assert body["ok"] is True


async def test_rotate_secrets_re_encrypts_under_the_newest_key(services: Services) -> None:
    old = CredentialService(
        services.storage, SecretBox(["old"]), outbound=services.credentials._outbound
    )
    await old.create(CredentialCreate(id="a", provider=Provider.OPENAI, secret=SECRET))
    await old.create(CredentialCreate(id="b", provider=Provider.MOCK))
    rotating = CredentialService(
        services.storage, SecretBox(["new", "old"]), outbound=services.credentials._outbound
    )
    assert await rotating.rotate_secrets() == 1
    only_new = CredentialService(
        services.storage, SecretBox(["new"]), outbound=services.credentials._outbound
    )
    assert (await only_new.reveal("a")).secret == SECRET


async def test_admin_routes_refuse_a_key_without_admin_rights(
    client: httpx.AsyncClient, services: Services
) -> None:
    headers = await user_headers(services)
    assert (await client.get("/admin/credentials", headers=headers)).status_code == 403
    assert (await client.post("/admin/credentials/x/test", headers=headers)).status_code == 403


async def test_no_secret_appears_in_any_response_or_log_line(
    client: httpx.AsyncClient,
    services: Services,
    upstream: Upstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    upstream.status = 401
    upstream.body = f'{{"error": "bad key {SECRET}"}}'
    responses = [
        await create(client, endpoint=upstream.url),
        await create(client),  # duplicate
        await create(client, id="bad id"),
        await client.get("/admin/credentials"),
        await client.get("/admin/credentials/openai-main"),
        await client.post("/admin/credentials/openai-main/test"),
        await client.patch("/admin/credentials/openai-main", json={"secret": SECRET + "2"}),
        await client.delete("/admin/credentials/openai-main"),
    ]
    await services.credentials.create(
        CredentialCreate(id="direct", provider=Provider.OPENAI, secret=SECRET)
    )
    logging.getLogger("probe").info("revealed %s", await services.credentials.reveal("direct"))
    for response in responses:
        assert SECRET not in response.text
    assert caplog.records, "the flows above log something"
    for record in caplog.records:
        assert SECRET not in record.getMessage()
    assert SECRET not in caplog.text


async def test_a_credential_without_a_known_endpoint_cannot_be_tested(
    client: httpx.AsyncClient,
) -> None:
    await create(client, id="az", provider="azure_openai")
    await create(client, id="own", provider="custom")
    await create(client, id="aws", provider="aws_bedrock")
    for credential_id, param in (("az", "endpoint"), ("own", "endpoint"), ("aws", "provider")):
        response = await client.post(f"/admin/credentials/{credential_id}/test")
        assert response.status_code == 400, credential_id
        assert response.json()["error"]["param"] == param

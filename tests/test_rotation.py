"""`gateway rotate-secrets`: every encrypted value rewritten under the newest key, counted."""

from __future__ import annotations

import asyncio

import pytest

from app.cli import main
from app.core.crypto import SecretBox
from app.core.outbound import OutboundClient, OutboundPolicy
from app.credentials.entities import Provider
from app.credentials.schemas import CredentialCreate
from app.credentials.service import CredentialService
from app.operations.service import OperationService
from app.storage.sql import SqlStorage, make_database
from app.webhooks.entities import Webhook
from app.webhooks.service import WebhookService
from tests.conftest import truncate_all
from tests.fakes import RecordingQueue

OLD = "rotation-tests-old-key-0123456789"
NEW = "rotation-tests-new-key-0123456789"


async def store_under(database_url: str, key: str) -> str:
    """A credential and a webhook with one header, encrypted under `key`; the webhook's id."""
    storage = SqlStorage(make_database(database_url, pool_size=2, max_overflow=0))
    box = SecretBox([key])
    client = OutboundClient(OutboundPolicy.parse(""))
    try:
        await CredentialService(storage, box).create(
            CredentialCreate(id="c", provider=Provider.OPENAI, secret="sk-rotated")
        )
        webhooks = WebhookService(
            storage, OperationService(storage, RecordingQueue(storage)).jobs, box, client
        )
        webhook, _ = await webhooks.create(
            url="https://hooks.example.com/in", headers={"Authorization": "Bearer t"}
        )
        return webhook.id
    finally:
        await client.aclose()
        await storage.close()


async def readable_with(database_url: str, key: str, webhook_id: str) -> bool:
    storage = SqlStorage(make_database(database_url, pool_size=1, max_overflow=0))
    box = SecretBox([key])
    try:
        revealed = await CredentialService(storage, box).reveal("c")
        async with storage.unit_of_work() as uow:
            webhook = await uow.repo(Webhook).get(webhook_id)
        assert webhook is not None
        box.decrypt(webhook.secret_encrypted)
        (header,) = webhook.headers.values()
        return (
            revealed.secret == "sk-rotated" and box.decrypt(header.split(":", 1)[1]) == "Bearer t"
        )
    finally:
        await storage.close()


@pytest.mark.postgres
def test_rotate_secrets_rewrites_credentials_and_webhooks_and_counts_each_kind(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    truncate_all(database_url)
    webhook_id = asyncio.run(store_under(database_url, OLD))
    monkeypatch.setenv("STORAGE_BACKEND", "postgres")
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("SECRET_KEY", f"{NEW},{OLD}")
    monkeypatch.setenv("BROKER", "stub")
    assert main(["rotate-secrets"]) == 0
    assert capsys.readouterr().out.strip() == (
        "Re-encrypted 1 credential secret(s), 1 webhook secret(s) and 1 webhook header "
        "value(s) with the newest key."
    )
    assert asyncio.run(readable_with(database_url, NEW, webhook_id))


def test_rotate_secrets_refuses_memory_storage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rotate-secrets"]) == 2
    assert "STORAGE_BACKEND=memory" in capsys.readouterr().err

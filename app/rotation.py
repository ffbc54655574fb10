"""`gateway rotate-secrets`: re-encrypt every value the gateway stores encrypted with the newest
SECRET_KEY, so the older keys can then be dropped."""

from __future__ import annotations

from dataclasses import dataclass

from app.config import Settings
from app.core.crypto import SecretBox
from app.credentials.service import CredentialService
from app.webhooks.service import rotate_webhook_secrets


@dataclass(frozen=True)
class Rotated:
    """How many encrypted values of each kind were rewritten under the newest key."""

    credential_secrets: int
    webhook_secrets: int
    webhook_header_values: int

    def summary(self) -> str:
        return (
            f"{self.credential_secrets} credential secret(s), {self.webhook_secrets} webhook "
            f"secret(s) and {self.webhook_header_values} webhook header value(s)"
        )


async def rotate_secrets(settings: Settings) -> Rotated:
    """Rewrite every stored encrypted value under the first key of SECRET_KEY."""
    from app.storage.factory import build_durable_storage

    storage = build_durable_storage(settings, why="keeps no secrets beyond one process")
    box = SecretBox(settings.secret_keys())
    try:
        credentials = await CredentialService(storage, box).rotate_secrets()
        webhooks = await rotate_webhook_secrets(storage, box)
    finally:
        await storage.close()
    return Rotated(credentials, webhooks.secrets, webhooks.header_values)

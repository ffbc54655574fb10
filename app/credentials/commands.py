"""`gateway rotate-secrets`: re-encrypt every stored credential with the newest SECRET_KEY."""

from __future__ import annotations

from app.config import Settings, StorageBackend
from app.core.crypto import SecretBox
from app.credentials.service import CredentialService


class CannotRotate(Exception):
    """The settings describe an install with nothing durable to rotate."""


async def rotate_secrets(settings: Settings) -> int:
    """Rewrite every stored secret under the first key of SECRET_KEY; returns how many."""
    if settings.STORAGE_BACKEND is StorageBackend.MEMORY:
        raise CannotRotate(
            "STORAGE_BACKEND=memory keeps no secrets beyond one process: set "
            "STORAGE_BACKEND=postgres (and DATABASE_URL)."
        )
    from app.storage.factory import build_storage

    storage = build_storage(settings)
    try:
        return await CredentialService(storage, SecretBox(settings.secret_keys())).rotate_secrets()
    finally:
        await storage.close()

"""The one place that turns settings into a storage backend (no silent fallback)."""

from __future__ import annotations

from app.config import Settings, StorageBackend
from app.storage.memory import MemoryStorage, MemoryStore
from app.storage.protocol import Storage
from app.storage.sql import SqlStorage, make_database


def build_storage(settings: Settings, *, memory_store: MemoryStore | None = None) -> Storage:
    """The backend `STORAGE_BACKEND` names; Postgres that is down stays down, never memory."""
    if settings.STORAGE_BACKEND is StorageBackend.MEMORY:
        return MemoryStorage(memory_store)
    database = make_database(
        settings.DATABASE_URL,
        pool_size=settings.DB_POOL_SIZE,
        max_overflow=settings.DB_MAX_OVERFLOW,
        connect_timeout=settings.DB_CONNECT_TIMEOUT,
        max_lifetime=settings.DB_POOL_MAX_LIFETIME_SECONDS,
        statement_cache=settings.DB_STATEMENT_CACHE,
        statement_timeout=settings.statement_timeout(),
    )
    return SqlStorage(database)


class NotDurable(Exception):
    """A one-off command was given STORAGE_BACKEND=memory, where what it writes dies with it."""


def build_durable_storage(settings: Settings, *, why: str, hint: str = "") -> Storage:
    """The configured database for a command whose work must outlive it; memory storage is
    refused with `NotDurable`, saying `why` it would be useless (and the `hint`)."""
    if settings.STORAGE_BACKEND is StorageBackend.MEMORY:
        raise NotDurable(
            f"STORAGE_BACKEND=memory {why}: set STORAGE_BACKEND=postgres (and DATABASE_URL){hint}."
        )
    return build_storage(settings)

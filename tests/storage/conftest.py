"""Fixtures of the storage tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from app.storage.sql import SqlStorage, make_database
from tests.conftest import truncate_all


@pytest.fixture
async def sql_storage(database_url: str) -> AsyncIterator[SqlStorage]:
    """The PostgreSQL backend alone, on an emptied database, with a pool of two connections."""
    truncate_all(database_url)
    backend = SqlStorage(make_database(database_url, pool_size=2, max_overflow=0))
    yield backend
    await backend.close()

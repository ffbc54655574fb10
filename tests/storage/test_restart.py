"""On PostgreSQL, one app instance's writes outlive it; a database that is down stays down."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from app.config import Settings
from app.core.errors import Unavailable
from app.main import create_app
from app.operations.entities import Operation
from app.schema import ENTITIES
from app.storage.entity import Entity
from app.storage.mapping import table_info
from app.storage.memory import MemoryStorage
from app.storage.sql import SqlStorage
from tests.conftest import truncate_all
from tests.factories import build, comparable, create

pytestmark = pytest.mark.postgres

CLOSED_PORT_DB = "postgresql://postgres@127.0.0.1:1/x"


@pytest.fixture(autouse=True)
def _no_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env


def postgres_settings(database_url: str, **overrides: Any) -> Settings:
    """The settings of an API process on PostgreSQL, as deployed."""
    return Settings(
        STORAGE_BACKEND="postgres",
        DATABASE_URL=database_url,
        SECRET_KEY="test-secret",
        PROCESS_ROLE="api",
        BROKER="stub",
        **overrides,
    )


def _key(entity: Entity) -> Any:
    return getattr(entity, table_info(type(entity)).pk)


async def test_every_entity_written_by_one_app_is_read_back_by_the_next(
    database_url: str,
) -> None:
    truncate_all(database_url)
    first = create_app(postgres_settings(database_url))
    async with first.router.lifespan_context(first):
        first_storage = first.state.storage
        assert isinstance(first_storage, SqlStorage)
        async with first_storage.unit_of_work() as uow:
            written = [await create(uow, entity) for entity in ENTITIES]
            await uow.commit()
    # A null survives any round trip: every compared field must hold a value.
    assert {
        type(e).__name__: [n for n, v in comparable(e).items() if v is None] for e in written
    } == {e.__name__: [] for e in ENTITIES}

    second = create_app(postgres_settings(database_url))
    async with second.router.lifespan_context(second):
        assert second.state.storage is not first_storage
        async with second.state.storage.unit_of_work() as uow:
            loaded = [await uow.repo(type(e)).get(_key(e)) for e in written]

    assert {
        type(e).__name__: comparable(found) if found is not None else None
        for e, found in zip(written, loaded, strict=True)
    } == {type(e).__name__: comparable(e) for e in written}


async def test_an_unreachable_database_raises_unavailable_and_nothing_falls_back_to_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made: list[MemoryStorage] = []
    make_memory = MemoryStorage.__init__

    def record(self: MemoryStorage, *args: Any, **kwargs: Any) -> None:
        made.append(self)
        make_memory(self, *args, **kwargs)

    monkeypatch.setattr(MemoryStorage, "__init__", record)
    app = create_app(postgres_settings(CLOSED_PORT_DB, DB_CONNECT_TIMEOUT=1))
    async with app.router.lifespan_context(app):
        storage = app.state.storage
        assert isinstance(storage, SqlStorage)
        began = time.monotonic()
        async with storage.unit_of_work() as uow:
            with pytest.raises(Unavailable):
                await uow.repo(Operation).add(build(Operation))
        async with storage.unit_of_work() as uow:
            with pytest.raises(Unavailable):
                await uow.repo(Operation).find()
        elapsed = time.monotonic() - began

    assert elapsed < 5
    assert made == []

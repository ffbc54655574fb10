"""`gateway create-key`: an admin key for a fresh install, printed once."""

from __future__ import annotations

import asyncio

import pytest

from app.access.service import ApiKeyService, Principal
from app.access.teams import ADMIN_TEAM_ID
from app.cli import main
from app.storage.sql import SqlStorage, make_database
from tests.conftest import truncate_all


async def authenticate(database_url: str, secret: str) -> Principal:
    storage = SqlStorage(make_database(database_url, pool_size=1, max_overflow=0))
    try:
        return await ApiKeyService(storage).authenticate(secret)
    finally:
        await storage.close()


@pytest.mark.postgres
def test_create_key_prints_an_admin_key_of_the_administrators_team(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    truncate_all(database_url)
    monkeypatch.setenv("STORAGE_BACKEND", "postgres")
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("SECRET_KEY", "create-key-tests-secret-0123456789")
    monkeypatch.setenv("BROKER", "stub")
    assert main(["create-key", "--name", "ops"]) == 0
    secret = capsys.readouterr().out.strip()
    assert secret.startswith("gw-")
    principal = asyncio.run(authenticate(database_url, secret))
    assert principal.admin and principal.team_id == ADMIN_TEAM_ID


def test_create_key_refuses_memory_storage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["create-key"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "STORAGE_BACKEND=memory" in captured.err

"""Settings refuse incoherent setups with a sentence that says what to change."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from app.config import BrokerKind, ProcessRole, Settings, StorageBackend

SECRET = "test-secret-key-of-sufficient-length"


@pytest.fixture(autouse=True)
def _no_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env


def test_the_defaults_are_the_embedded_single_process_setup() -> None:
    settings = Settings()
    assert settings.PROCESS_ROLE is ProcessRole.DEV
    assert settings.STORAGE_BACKEND is StorageBackend.MEMORY
    assert settings.BROKER is BrokerKind.FAKEREDIS


@pytest.mark.parametrize(
    ("values", "sentence"),
    [
        pytest.param(
            {"PROCESS_ROLE": "api"},
            "STORAGE_BACKEND=memory keeps data inside one process",
            id="memory-with-api-role",
        ),
        pytest.param(
            {"PROCESS_ROLE": "worker", "BROKER": "redis"},
            "STORAGE_BACKEND=memory keeps data inside one process",
            id="memory-with-worker-role",
        ),
        pytest.param(
            {"BROKER": "redis"},
            "STORAGE_BACKEND=memory with BROKER=redis",
            id="memory-with-redis-broker",
        ),
        pytest.param(
            {"STORAGE_BACKEND": "postgres", "SECRET_KEY": SECRET, "PROCESS_ROLE": "worker"},
            "BROKER=fakeredis lives inside one process",
            id="fakeredis-with-worker-role",
        ),
        pytest.param(
            {"STORAGE_BACKEND": "postgres"},
            "STORAGE_BACKEND=postgres stores encrypted secrets",
            id="postgres-without-secret-key",
        ),
        pytest.param(
            {
                "STORAGE_BACKEND": "postgres",
                "SECRET_KEY": SECRET,
                "DATABASE_URL": "mysql://user@host/db",
            },
            "DATABASE_URL must be a PostgreSQL URL",
            id="non-postgres-database-url",
        ),
    ],
)
def test_an_incoherent_setup_is_refused_with_its_sentence(
    values: dict[str, Any], sentence: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(**values)
    assert sentence in str(caught.value)


def test_the_environment_is_read_and_refused_the_same_way(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROCESS_ROLE", "api")
    with pytest.raises(ValidationError, match="STORAGE_BACKEND=memory keeps data"):
        Settings()


@pytest.mark.parametrize("url", ["postgresql://user@host/db", "postgres://user:pw@host:5432/db"])
def test_a_postgres_url_is_accepted(url: str) -> None:
    settings = Settings(STORAGE_BACKEND="postgres", SECRET_KEY=SECRET, DATABASE_URL=url)
    assert url == settings.DATABASE_URL


def test_the_distributed_setup_is_accepted() -> None:
    settings = Settings(
        PROCESS_ROLE="api", STORAGE_BACKEND="postgres", SECRET_KEY=SECRET, BROKER="redis"
    )
    assert settings.PROCESS_ROLE is ProcessRole.API

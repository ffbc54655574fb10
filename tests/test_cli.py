"""The `gateway` command: settings errors as sentences, and each subcommand's wiring."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI

from app.cli import main
from app.config import Settings

POSTGRES_ENV = {
    "STORAGE_BACKEND": "postgres",
    "SECRET_KEY": "test-secret-key-of-sufficient-length",
    "BROKER": "redis",
}


@pytest.fixture(autouse=True)
def _no_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """What `uvicorn.run` was asked to serve, instead of serving it."""
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(
        uvicorn, "run", lambda app, **options: calls.append({"app": app, **options})
    )
    return calls


def test_api_on_memory_storage_exits_2_with_the_sentence(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["api"]) == 2
    err = capsys.readouterr().err
    assert "STORAGE_BACKEND=memory keeps data inside one process" in err
    assert "Traceback" not in err


def test_a_malformed_field_exits_2_naming_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DB_POOL_SIZE", "lots")
    assert main(["dev"]) == 2
    assert "DB_POOL_SIZE: Input should be a valid integer" in capsys.readouterr().err


def test_the_console_script_exits_2_without_a_traceback(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "STORAGE_BACKEND": "postgres"}
    result = subprocess.run(
        [sys.executable, "-m", "app", "dev"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "set SECRET_KEY to a long random string" in result.stderr
    assert "Traceback" not in result.stderr


def test_dev_serves_one_app_built_from_the_dev_settings(served: list[dict[str, Any]]) -> None:
    assert main(["dev", "--port", "9123"]) == 0
    [call] = served
    assert isinstance(call["app"], FastAPI)
    assert call["app"].state.settings.PROCESS_ROLE == "dev"
    assert call["app"].state.settings.STORAGE_BACKEND == "memory"
    assert (call["host"], call["port"]) == ("127.0.0.1", 9123)


def test_api_with_several_workers_serves_the_app_factory(
    monkeypatch: pytest.MonkeyPatch, served: list[dict[str, Any]]
) -> None:
    for name, value in POSTGRES_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PROCESS_ROLE", "dev")  # restored afterwards; the command sets "api"
    assert main(["api", "--host", "0.0.0.0", "--workers", "3"]) == 0
    [call] = served
    assert call["app"] == "app.main:create_app"
    assert call["factory"] is True and call["workers"] == 3
    assert call["host"] == "0.0.0.0"
    assert Settings().PROCESS_ROLE == "api"


def test_migrate_upgrades_the_configured_database(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    upgraded: list[str] = []
    fake = types.ModuleType("app.storage.migrate")
    fake.upgrade_to_head = upgraded.append  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "app.storage.migrate", fake)
    present = types.ModuleType("app.storage.provision")
    present.CannotCreateDatabase = type("CannotCreateDatabase", (Exception,), {})  # type: ignore[attr-defined]
    present.create_database_if_missing = lambda url: None  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "app.storage.provision", present)
    monkeypatch.setenv("DATABASE_URL", "postgresql://gateway:s3cret@db.example:5432/gateway")
    assert main(["migrate"]) == 0
    assert upgraded == ["postgresql://gateway:s3cret@db.example:5432/gateway"]
    assert "s3cret" not in capsys.readouterr().out


def test_migrate_reports_an_unreachable_database_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://postgres@127.0.0.1:1/gateway")
    assert main(["migrate"]) == 1
    err = capsys.readouterr().err
    assert "cannot reach the database at postgresql://postgres@127.0.0.1:1/gateway" in err
    assert "Traceback" not in err


def test_worker_refuses_memory_storage_with_the_reason(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("STORAGE_BACKEND", "memory")
    assert main(["worker"]) == 2
    assert "STORAGE_BACKEND=memory" in capsys.readouterr().err


def test_worker_refuses_an_unknown_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in POSTGRES_ENV.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit, match="unknown queue"):
        main(["worker", "--queues", "nope"])

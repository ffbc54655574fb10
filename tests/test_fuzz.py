"""Property-based fuzz of the whole HTTP API: nothing a client sends is answered with a 5xx, and
every answer has the shape the OpenAPI schema declares.

Schemathesis generates requests, valid and invalid (boundary values, wrong types, missing
fields, unexpected methods), for every operation of the app's own OpenAPI schema and sends them
in-process over ASGI, authenticated as the administrator so that the admin routes are reached
past authentication. It runs on the memory backend and on PostgreSQL, which refuses values
(NUL characters, integers past 64 bits) that the memory backend keeps.
"""

from __future__ import annotations

import secrets
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error, response_schema_conformance

from app.config import Settings
from app.main import create_app
from app.storage.memory import MemoryStorage
from tests.conftest import truncate_all
from tests.fakes import RecordingQueue

ADMIN = "gw-admin-secret-for-fuzz-tests-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
# Random model names only ever reach "not found"; the built-in offline models let generated
# requests go through routing, metering and the provider code as well.
MODEL_OF_PATH = {"/v1/chat/completions": "mock", "/v1/embeddings": "mock-embedding"}
CHECKS = [not_a_server_error, response_schema_conformance]

pytestmark = pytest.mark.slow


def fuzz_settings(**overrides: Any) -> Settings:
    # Explicit values and no `.env` file: the environment of the run must not change the app.
    values: dict[str, Any] = {"BROKER": "stub", "ADMIN_API_KEY": ADMIN, **overrides}
    return Settings(_env_file=None, **values)


def build_memory_app() -> FastAPI:
    storage = MemoryStorage()
    return create_app(fuzz_settings(), storage=storage, queue=RecordingQueue(storage))


# Schemathesis parametrizes from the schema at collection, so the app is built at import; nothing
# runs until the first request starts its lifespan.
memory_app = build_memory_app()
schema = schemathesis.openapi.from_dict(memory_app.openapi())
schema.app = memory_app
# The coverage phase sends each parameter's boundary and invalid values (the bad inputs that
# must be clean 4xx answers); valid values come from the fuzzing phase. One unlisted method per
# operation is enough to show that a 405 is a clean error too.
schema.config.phases.coverage.generation.modes = [GenerationMode.NEGATIVE]
schema.config.phases.coverage.unexpected_methods = {"put"}

fuzz = settings(
    max_examples=5,
    deadline=None,
    derandomize=True,  # the same requests on every run: a failure here is never a fluke
    database=None,
    suppress_health_check=list(HealthCheck),
)


def with_known_model(case: Any) -> Any:
    model = MODEL_OF_PATH.get(case.operation.path)
    if (
        model is not None
        and isinstance(case.body, dict)
        and isinstance(case.body.get("model"), str)
    ):
        case.body["model"] = model
    return case


@pytest.fixture(scope="module")
def postgres_app(database_url: str) -> FastAPI:
    truncate_all(database_url)
    # Storage built by the app's own lifespan, so it is opened and closed on the loop that uses it.
    return create_app(
        fuzz_settings(
            STORAGE_BACKEND="postgres",
            DATABASE_URL=database_url,
            SECRET_KEY=secrets.token_urlsafe(32),
        )
    )


@schema.parametrize()
@fuzz
def test_no_request_is_a_server_error_on_memory_storage(case: Any) -> None:
    with_known_model(case).call_and_validate(headers=AUTH, checks=CHECKS)


@pytest.mark.postgres
@schema.parametrize()
@fuzz
def test_no_request_is_a_server_error_on_postgres(case: Any, postgres_app: FastAPI) -> None:
    with_known_model(case).call_and_validate(headers=AUTH, checks=CHECKS, app=postgres_app)

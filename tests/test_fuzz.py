"""Property-based fuzz of the whole HTTP API: nothing a client sends is answered with a 5xx, and
every answer has the shape the OpenAPI schema declares.

Schemathesis generates requests (valid and invalid) for every operation of the app's own OpenAPI
schema and sends them in-process over ASGI, authenticated as the administrator so the admin
routes are reached past authentication.
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error, response_schema_conformance

from app.config import Settings
from app.main import create_app
from app.storage.memory import MemoryStorage
from tests.fakes import RecordingQueue

ADMIN = "gw-admin-secret-for-fuzz-tests-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN}"}

pytestmark = pytest.mark.slow



def build_fuzz_app() -> FastAPI:
    # Built at import (schemathesis parametrizes from the schema at collection), but nothing
    # runs until the first request starts the lifespan; explicit settings, no `.env` file.
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, STORAGE_BACKEND="memory", BROKER="stub", ADMIN_API_KEY=ADMIN
    )
    storage = MemoryStorage()
    return create_app(settings, storage=storage, queue=RecordingQueue(storage))


fuzz_app = build_fuzz_app()
schema = schemathesis.openapi.from_dict(fuzz_app.openapi())
schema.app = fuzz_app


@schema.parametrize()
@settings(
    max_examples=15,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_request_is_answered_with_a_server_error(case: Any) -> None:
    case.call_and_validate(
        headers=AUTH,
        checks=[not_a_server_error, response_schema_conformance],
    )

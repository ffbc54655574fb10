"""`LOG_FORMAT=json` in real processes: the API (uvicorn's access log included) and a Dramatiq
worker process write nothing but JSON lines, and a job's lines carry its operation id."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.processes import (
    ADMIN_KEY,
    Processes,
    chat,
    env_for,
    free_port,
    wait_until,
)

pytestmark = pytest.mark.slow

FIELDS = {"time", "level", "logger", "message", "request_id", "operation_id", "key_id"}
FIELDS |= {"model", "status", "duration_ms"}


def _lines(log: Path) -> list[dict[str, Any]]:
    parsed = []
    for line in log.read_text().splitlines():
        if line.strip():
            parsed.append(orjson.loads(line))  # a line that is not JSON fails the test here
    return parsed


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_api_and_worker_processes_write_json_lines_with_the_job_context(
    clean: tuple[str, str],
    processes: Processes,
    tmp_path: Path,
) -> None:
    database_url, redis_url = clean
    # A generated first password is printed once as plain text, on purpose never logged.
    env = env_for(
        database_url,
        redis_url,
        LOG_FORMAT="json",
        LOG_LEVEL="INFO",
        ADMIN_DEFAULT_PASSWORD="a-chosen-password",
    )
    port = free_port()
    processes.start(["api", "--port", str(port)], {**env, "PROCESS_ROLE": "api"})
    processes.start(["worker", "--processes", "1", "--threads", "2"], env)
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: _answers(f"{base}/live"), 30)
    headers = {"Authorization": f"Bearer {ADMIN_KEY}", "x-request-id": "req-json-logs-1"}
    accepted = httpx.post(
        f"{base}/v1/chat/completions?async=true", json=chat(3), headers=headers, timeout=10
    )
    assert accepted.status_code == 202, accepted.text
    operation_id = accepted.json()["operation_id"]
    polled = httpx.get(f"{base}/v1/operations/{operation_id}?wait=20", headers=headers, timeout=25)
    assert polled.json()["status"] == "completed"
    time.sleep(0.5)  # the worker's line after the result is stored
    processes.stop_all()

    api, worker = (_lines(tmp_path / f"{n}.log") for n in (0, 1))
    for line in api + worker:
        assert line.keys() >= FIELDS, line
    access = [line for line in api if line["logger"] == "uvicorn.access"]
    submitted = [line for line in access if line["request_id"] == "req-json-logs-1"]
    assert {line["status"] for line in submitted} == {202, 200}
    assert {line["key_id"] for line in submitted} == {"admin"}
    ran = [line for line in worker if line["operation_id"] == operation_id]
    assert ran and ran[0]["status"] == "succeeded" and ran[0]["duration_ms"] >= 0
    assert ran[0]["key_id"] == "admin"  # the job owner's key
    assert any(line["logger"].startswith("dramatiq") for line in worker)

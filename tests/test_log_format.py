"""Log lines as text or JSON: the format chosen by settings, the fields of a JSON line, and the
context ids they carry."""

from __future__ import annotations

import io
import logging
import logging.config

import orjson
import pytest

from app.cli import log_config
from app.config import LogFormat, Settings
from app.core.log_context import key_id_var, operation_id_var, request_id_var
from app.core.log_format import JsonFormatter, LogContextFilter

STRONG_KEY = "kF8s2LqP0vX7nR4tY1wZ9mB3cD6hJ5aE"


def test_text_is_the_development_default_and_json_the_production_one() -> None:
    assert Settings().log_format() is LogFormat.TEXT
    production = Settings(ENVIRONMENT="production", SECRET_KEY=STRONG_KEY)
    assert production.log_format() is LogFormat.JSON
    chosen = Settings(ENVIRONMENT="production", SECRET_KEY=STRONG_KEY, LOG_FORMAT="text")
    assert chosen.log_format() is LogFormat.TEXT


def test_a_log_format_that_does_not_exist_is_refused() -> None:
    with pytest.raises(ValueError, match="LOG_FORMAT"):
        Settings(LOG_FORMAT="xml")


def _record(logger: str, message: str, *args: object, **extra: object) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(LogContextFilter())
    log = logging.getLogger(logger)
    log.addHandler(handler)
    log.propagate = False
    try:
        try:
            raise RuntimeError("the cause")
        except RuntimeError:
            log.error(message, *args, exc_info=bool(extra.pop("exc", False)), extra=extra)
    finally:
        log.removeHandler(handler)
    return stream.getvalue()


def test_a_json_line_carries_the_context_ids_the_extra_fields_and_the_traceback() -> None:
    tokens = (request_id_var.set("req-1"), operation_id_var.set("op-1"), key_id_var.set("key-1"))
    try:
        text = _record("test.json", "ran %s", "it", model="m", duration_ms=1.5, exc=True)
    finally:
        key_id_var.reset(tokens[2])
        operation_id_var.reset(tokens[1])
        request_id_var.reset(tokens[0])
    (line,) = text.splitlines()
    parsed = orjson.loads(line)
    assert parsed["time"].endswith("+00:00") and "T" in parsed["time"]
    assert parsed | {"time": None, "exc_info": None} == {
        "time": None,
        "level": "ERROR",
        "logger": "test.json",
        "message": "ran it",
        "request_id": "req-1",
        "operation_id": "op-1",
        "key_id": "key-1",
        "model": "m",
        "status": None,
        "duration_ms": 1.5,
        "exc_info": None,
    }
    assert parsed["exc_info"].startswith("Traceback") and "RuntimeError: the cause" in line


def test_outside_any_request_or_job_the_ids_are_null() -> None:
    parsed = orjson.loads(_record("test.json", "idle"))
    assert (parsed["request_id"], parsed["operation_id"], parsed["key_id"]) == (None,) * 3
    assert "exc_info" not in parsed


def test_uvicorn_access_lines_give_their_status() -> None:
    parsed = orjson.loads(
        _record("uvicorn.access", '%s - "%s %s HTTP/%s" %d', "1.2.3.4", "GET", "/live", "1.1", 200)
    )
    assert parsed["status"] == 200 and parsed["message"] == '1.2.3.4 - "GET /live HTTP/1.1" 200'


def test_json_mode_formats_every_handler_uvicorn_access_log_included() -> None:
    config = log_config(Settings(LOG_FORMAT="json"))
    for name in ("app", "default", "access"):
        assert config["formatters"][name] == {"()": JsonFormatter}
        assert config["handlers"][name]["filters"] == ["context"]
    text = log_config(Settings(LOG_FORMAT="text"))
    assert "()" not in text["formatters"]["app"]

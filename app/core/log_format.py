"""What every log line says about the work it belongs to, as text or as one JSON object a line.

The request id, the job's operation id and the API key id come from `app.core.log_context`. A
call may add `model`, `status` and `duration_ms` with `extra=`; uvicorn's access lines give
their status themselves.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import orjson

from app.core.log_context import key_id_var, operation_id_var, request_id_var

# The fields a call may pass with `extra=`, in the order a JSON line shows them.
EXTRA_FIELDS = ("model", "status", "duration_ms")
_ACCESS_LOGGER = "uvicorn.access"


class LogContextFilter(logging.Filter):
    """Adds `request_id`, `operation_id` and `key_id` to every record ("-" when unknown, which
    the text format prints; the JSON format gives null)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get() or "-"
        record.operation_id = operation_id_var.get() or "-"
        record.key_id = key_id_var.get() or "-"
        return True


def _known(record: logging.LogRecord, name: str) -> Any:
    value = getattr(record, name, None)
    return None if value == "-" else value


def _access_status(record: logging.LogRecord) -> Any:
    """The status code of a uvicorn access line: its last argument."""
    args = record.args
    if record.name == _ACCESS_LOGGER and isinstance(args, tuple) and len(args) == 5:
        return args[4]
    return None


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (ISO 8601, UTC), level, logger, message, the context
    ids, `model`, `status`, `duration_ms` (null when unknown), and a traceback as a string."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": _known(record, "request_id") or request_id_var.get(),
            "operation_id": _known(record, "operation_id") or operation_id_var.get(),
            "key_id": _known(record, "key_id") or key_id_var.get(),
        }
        for name in EXTRA_FIELDS:
            line[name] = getattr(record, name, None)
        if line["status"] is None:
            line["status"] = _access_status(record)
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc_info"] = record.exc_text
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        # `default=str`: a value passed with `extra=` that JSON cannot hold still gives a line.
        return orjson.dumps(line, default=str).decode()

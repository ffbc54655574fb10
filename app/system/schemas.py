"""HTTP shapes of the operator endpoints."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class HealthRead(BaseModel):
    status: Literal["ok"] = "ok"
    version: str


class LiveRead(BaseModel):
    status: Literal["ok"] = "ok"


class CheckRead(BaseModel):
    """The state of one dependency; `error` says why it is unavailable."""

    status: Literal["ok", "unavailable"]
    latency_ms: float | None = None
    backend: str | None = None
    error: str | None = None


class ReadyRead(BaseModel):
    status: Literal["ready", "not_ready"]
    checks: dict[str, CheckRead]

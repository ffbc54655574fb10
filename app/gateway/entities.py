"""The model_chains table: named, ordered fallbacks over models."""

from __future__ import annotations

from typing import Any

from app.storage.entity import Entity, json_list, pk, text


class ModelChain(Entity, table=True):
    """A name clients can put in `model`, tried step by step until one model answers."""

    __tablename__ = "model_chains"

    id: str = pk()
    name: str = text(max_length=200)
    description: str | None = text(None)
    # [{model_id, max_retries, backoff_ms, latency_threshold_ms}], tried in order.
    steps: list[dict[str, Any]] = json_list()
    enabled: bool = True

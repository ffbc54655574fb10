"""The models and model_chains tables: the names clients ask for, each mapped to a provider's
model and its price, or to an ordered fallback over models."""

from __future__ import annotations

from decimal import Decimal
from enum import StrEnum
from typing import Any

from app.credentials.entities import Provider
from app.storage.entity import (
    Entity,
    choice,
    json_list,
    json_object,
    money,
    pk,
    reference,
    text,
)


class ModelKind(StrEnum):
    CHAT = "chat"
    EMBEDDING = "embedding"


class Model(Entity, table=True):
    """A model clients can call, routed to `provider_model` with the given credential."""

    __tablename__ = "models"

    id: str = pk()
    name: str = text(max_length=200)
    description: str | None = text(None)
    kind: ModelKind = choice(ModelKind, ModelKind.CHAT)
    provider: Provider = choice(Provider)
    provider_model: str = text(max_length=200)
    # A credential in use cannot be deleted: the models calling with it would stop working.
    credential_id: str | None = reference("credentials.id", on_delete="RESTRICT", nullable=True)
    # Default sampling parameters, system prompt, timeouts, retries and fallback model.
    parameters: dict[str, Any] = json_object()
    context_window: int | None = None
    input_price_per_million: Decimal = money()
    output_price_per_million: Decimal = money()
    enabled: bool = True
    # Incremented whenever the parameters change, so cached responses and logs can tell them apart.
    config_version: int = 1


class ModelChain(Entity, table=True):
    """A name clients can put in `model`, tried step by step until one model answers."""

    __tablename__ = "model_chains"

    id: str = pk()
    name: str = text(max_length=200)
    description: str | None = text(None)
    # [{model_id, max_retries, backoff_ms, latency_threshold_ms}], tried in order.
    steps: list[dict[str, Any]] = json_list()
    enabled: bool = True

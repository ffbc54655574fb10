"""The models table: the names clients ask for, mapped to a provider's model and its price."""

from __future__ import annotations

from decimal import Decimal
from enum import StrEnum
from typing import Any

from app.credentials.entities import Provider
from app.storage.entity import Entity, choice, json_object, money, pk, reference, text


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

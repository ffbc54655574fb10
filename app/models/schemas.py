"""Models as the admin API and `/v1/models` show them."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    field_validator,
)

from app.core.ids import MODEL_NAME_MAX, is_model_name
from app.core.schemas import ListPage, PartialUpdate
from app.credentials.entities import Provider
from app.credentials.schemas import check_endpoint
from app.models.entities import Model, ModelChain, ModelKind

# `owned_by` of a chain in `/v1/models`: it is the gateway's routing, not a provider's model.
CHAIN_OWNER = "gateway"

# Shown as a JSON number: a client reading a price expects one, and six places fit a float.
Price = Annotated[
    Decimal,
    Field(ge=0, max_digits=18, decimal_places=6),
    PlainSerializer(float, return_type=float, when_used="json"),
]


def _slug(value: str) -> str:
    if not is_model_name(value):
        raise ValueError(
            f"must be 1 to {MODEL_NAME_MAX} letters and digits, with '.', '_', ':' or '-' "
            "inside (e.g. 'gpt-4.1-mini')"
        )
    return value


class ModelParameters(BaseModel):
    """Default request parameters; the known ones are range-checked, others are kept as given."""

    model_config = ConfigDict(extra="allow")

    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    system_prompt: str | None = None
    timeout_ms: int | None = Field(default=None, ge=1)
    # Overrides the credential's endpoint; like it, an http(s) URL without credentials in it.
    base_url: str | None = Field(default=None, max_length=2000)
    max_retries: int | None = Field(default=None, ge=0, le=20)
    # The built-in mock provider's behaviour.
    mock_latency_ms: float | None = Field(default=None, ge=0, le=600_000)
    mock_failure_rate: float | None = Field(default=None, ge=0, le=1)
    mock_failure: Literal["transient", "permanent", "timeout", "rate_limit"] | None = None
    mock_reply: str | None = Field(default=None, max_length=100_000)
    # The reply to a last user message containing a key: the first key found wins.
    mock_replies: dict[str, str] | None = Field(default=None, max_length=100)

    _base_url = field_validator("base_url")(check_endpoint)

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class ModelCreate(BaseModel):
    """A new model: the name clients use, and where requests for it go."""

    model_config = ConfigDict(extra="forbid")

    id: str
    name: str | None = Field(default=None, min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=2000)
    kind: ModelKind = ModelKind.CHAT
    provider: Provider
    provider_model: str = Field(min_length=1, max_length=200)
    credential_id: str | None = Field(default=None, max_length=50)
    parameters: ModelParameters = Field(default_factory=ModelParameters)
    context_window: int | None = Field(default=None, ge=1)
    input_price_per_million: Price = Decimal(0)
    output_price_per_million: Price = Decimal(0)
    enabled: bool = True

    _id = field_validator("id")(_slug)


class ModelUpdate(PartialUpdate):
    """Changes to a model; `parameters` replaces the whole object."""

    clearable = frozenset({"description", "credential_id", "context_window"})

    name: str | None = Field(default=None, min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=2000)
    kind: ModelKind | None = None
    provider: Provider | None = None
    provider_model: str | None = Field(default=None, min_length=1, max_length=200)
    credential_id: str | None = Field(default=None, max_length=50)
    parameters: ModelParameters | None = None
    context_window: int | None = Field(default=None, ge=1)
    input_price_per_million: Price | None = None
    output_price_per_million: Price | None = None
    enabled: bool | None = None


class ModelRead(BaseModel):
    """A model as administrators see it."""

    id: str
    name: str
    description: str | None
    kind: ModelKind
    provider: Provider
    provider_model: str
    credential_id: str | None
    parameters: dict[str, Any]
    context_window: int | None
    input_price_per_million: Price
    output_price_per_million: Price
    enabled: bool
    config_version: int
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, model: Model) -> ModelRead:
        return cls.model_validate(model, from_attributes=True)


class ModelList(ListPage[ModelRead]):
    pass


class OpenAIModel(BaseModel):
    """OpenAI's model object (a chain is listed as one, owned by the gateway)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str

    @classmethod
    def of(cls, named: Model | ModelChain) -> OpenAIModel:
        owner = named.provider if isinstance(named, Model) else CHAIN_OWNER
        return cls(id=named.id, created=int(named.created_at.timestamp()), owned_by=owner)


class OpenAIModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]

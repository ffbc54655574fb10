"""Webhook subscriptions and deliveries as administrators send and read them."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from app.core.schemas import ListPage, from_entity
from app.webhooks.entities import DeliveryStatus, Webhook, WebhookDelivery, WebhookStatus

# How a custom header's value is shown; sent back in an update, it keeps the stored value.
MASKED_HEADER = "***"


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(max_length=2048, description="Where deliveries are POSTed (http or https).")
    name: str | None = Field(default=None, max_length=200)
    description: str | None = Field(default=None, max_length=2000)
    events: list[str] = Field(
        default_factory=list,
        max_length=100,
        description="Event types, `<group>.*` or `*`; empty means every event.",
    )
    headers: dict[str, str] = Field(
        default_factory=dict,
        description="Sent with each delivery; the values are stored encrypted and never shown.",
    )
    enabled: bool = True
    secret: str | None = Field(
        default=None, description="A `whsec_<base64>` secret to use instead of a generated one."
    )


class WebhookUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(default=None, max_length=2048)
    name: str | None = Field(default=None, min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=2000)
    events: list[str] | None = Field(default=None, max_length=100)
    headers: dict[str, str] | None = Field(
        default=None,
        description="Replaces every custom header; a value of `***` keeps that header's value.",
    )
    enabled: bool | None = None


class WebhookRead(BaseModel):
    """A subscription; never its secret."""

    id: str
    object: Literal["webhook"] = "webhook"
    name: str
    description: str | None
    url: str
    events: list[str]
    headers: dict[str, str] = Field(description="The custom header names; every value is `***`.")
    enabled: bool
    status: WebhookStatus
    disabled_reason: str | None
    failure_count: int
    failing_since: datetime | None
    last_success_at: datetime | None
    last_failure_at: datetime | None
    previous_secret_expires_at: datetime | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, webhook: Webhook) -> WebhookRead:
        return from_entity(
            cls,
            webhook,
            headers=dict.fromkeys(webhook.headers, MASKED_HEADER),
            enabled=webhook.status == WebhookStatus.ACTIVE,
        )


class WebhookWithSecret(WebhookRead):
    """A subscription right after creation or rotation: the only time its secret is shown."""

    secret: str

    @classmethod
    def with_secret(cls, webhook: Webhook, secret: str) -> WebhookWithSecret:
        return cls(**WebhookRead.of(webhook).model_dump(), secret=secret)


class WebhookList(ListPage[WebhookRead]):
    pass


class WebhookDeleted(BaseModel):
    id: str
    object: Literal["webhook"] = "webhook"
    deleted: Literal[True] = True


class EventType(BaseModel):
    name: str
    description: str


class EventTypeList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EventType]


class DeliveryRead(BaseModel):
    """One event sent to one subscription, with every attempt."""

    id: str
    object: Literal["webhook.delivery"] = "webhook.delivery"
    webhook_id: str
    event_id: str
    event_type: str
    status: DeliveryStatus
    attempts: int
    next_attempt_at: datetime | None
    last_attempt_at: datetime | None
    completed_at: datetime | None
    response_status: int | None
    response_excerpt: str | None
    error: str | None
    attempt_log: list[dict[str, Any]]
    payload: dict[str, Any]
    operation_id: str | None
    created_at: datetime

    @classmethod
    def of(cls, delivery: WebhookDelivery) -> DeliveryRead:
        return from_entity(cls, delivery)


class DeliveryList(ListPage[DeliveryRead]):
    pass


class ReplayRange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    since: AwareDatetime = Field(description="Replay failed deliveries created at or after this.")
    until: AwareDatetime | None = Field(default=None, description="…and before this.")


class ReplayResult(BaseModel):
    object: Literal["webhook.replay"] = "webhook.replay"
    replayed: int
    delivery_ids: list[str]

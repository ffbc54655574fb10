"""The webhook tables: subscribers to the gateway's events, and each delivery to one of them."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa

from app.storage.entity import (
    Entity,
    choice,
    instant,
    json_list,
    json_object,
    pk,
    reference,
    text,
)


class WebhookStatus(StrEnum):
    ACTIVE = "active"
    PAUSED = "paused"
    DISABLED = "disabled"  # by the gateway after failing for too long; re-enabled by hand


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    EXHAUSTED = "exhausted"


class Webhook(Entity, table=True):
    """A subscriber URL, the events it wants, and the secret its deliveries are signed with."""

    __tablename__ = "webhooks"

    id: str = pk()
    name: str = text(max_length=200)
    description: str | None = text(None)
    url: str = text()
    secret_encrypted: str = text()
    # After a rotation both secrets sign deliveries until this one expires, so receivers can switch.
    previous_secret_encrypted: str | None = text(None)
    previous_secret_expires_at: datetime | None = instant()
    events: list[str] = json_list()
    # Custom headers by name; each value is "secretbox:" + its ciphertext (or, in rows written
    # before values were encrypted, the value in clear). Only the names are ever shown.
    headers: dict[str, str] = json_object()
    status: WebhookStatus = choice(WebhookStatus, WebhookStatus.ACTIVE, index=True)
    failure_count: int = 0
    failing_since: datetime | None = instant()
    disabled_reason: str | None = text(None)
    last_success_at: datetime | None = instant()
    last_failure_at: datetime | None = instant()


class WebhookDelivery(Entity, table=True):
    """One event sent to one webhook, with every attempt made to deliver it."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        # One delivery per event and subscriber, so emitting an event twice sends it once.
        sa.UniqueConstraint(
            "webhook_id", "event_id", name="uq_webhook_deliveries_webhook_id_event_id"
        ),
        sa.Index(
            "ix_webhook_deliveries_webhook_id_status_next_attempt_at",
            "webhook_id",
            "status",
            "next_attempt_at",
        ),
        sa.Index("ix_webhook_deliveries_webhook_id_created_at", "webhook_id", "created_at"),
        sa.Index("ix_webhook_deliveries_status_next_attempt_at", "status", "next_attempt_at"),
    )

    id: str = pk()
    # The composite keys lead with webhook_id, so they serve lookups by webhook as well.
    webhook_id: str = reference("webhooks.id", index=False)
    # The `webhook-id` header: the same on every attempt, so receivers can drop duplicates.
    event_id: str = text(max_length=64)
    event_type: str = text(max_length=100)
    payload: dict[str, Any] = json_object()
    status: DeliveryStatus = choice(DeliveryStatus, DeliveryStatus.PENDING)
    attempts: int = 0
    next_attempt_at: datetime | None = instant()
    last_attempt_at: datetime | None = instant()
    completed_at: datetime | None = instant()
    response_status: int | None = None
    response_excerpt: str | None = text(None)  # the start of the response body
    error: str | None = text(None)
    # One entry per attempt: instant, response status, duration, error.
    attempt_log: list[dict[str, Any]] = json_list()
    operation_id: str | None = text(None, max_length=64)

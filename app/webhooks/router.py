"""Admin endpoints for webhook subscriptions, their delivery log and replay."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from pydantic import AwareDatetime

from app.access.deps import AdminDep
from app.core.provide import provide
from app.core.schemas import PageAfter, PageLimit
from app.webhooks import catalogue
from app.webhooks.entities import DeliveryStatus
from app.webhooks.schemas import (
    DeliveryList,
    DeliveryRead,
    EventType,
    EventTypeList,
    ReplayRange,
    ReplayResult,
    WebhookCreate,
    WebhookDeleted,
    WebhookList,
    WebhookRead,
    WebhookUpdate,
    WebhookWithSecret,
)
from app.webhooks.service import WebhookService

router = APIRouter(prefix="/admin/webhooks", tags=["admin: webhooks"])

WebhooksDep = Annotated[WebhookService, Depends(provide(WebhookService))]


@router.post("", response_model=WebhookWithSecret, status_code=201)
async def create_webhook(
    body: WebhookCreate, admin: AdminDep, webhooks: WebhooksDep
) -> WebhookWithSecret:
    """Subscribe a URL to events; the response shows the signing secret, once."""
    webhook, secret = await webhooks.create(
        url=body.url,
        name=body.name,
        description=body.description,
        events=body.events,
        headers=body.headers,
        enabled=body.enabled,
        secret=body.secret,
    )
    return WebhookWithSecret.with_secret(webhook, secret)


@router.get("", response_model=WebhookList)
async def list_webhooks(
    admin: AdminDep,
    webhooks: WebhooksDep,
    limit: PageLimit = 20,
    after: PageAfter = None,
) -> WebhookList:
    """Every subscription, newest first."""
    return WebhookList.of(await webhooks.list_webhooks(limit=limit, after=after), WebhookRead.of)


@router.get("/event-types", response_model=EventTypeList)
async def list_event_types(admin: AdminDep) -> EventTypeList:
    """The event types a subscription can name."""
    return EventTypeList(
        data=[EventType(name=n, description=d) for n, d in catalogue.EVENT_TYPES.items()]
    )


@router.get("/{webhook_id}", response_model=WebhookRead)
async def get_webhook(webhook_id: str, admin: AdminDep, webhooks: WebhooksDep) -> WebhookRead:
    """One subscription (without its secret)."""
    return WebhookRead.of(await webhooks.get(webhook_id))


@router.patch("/{webhook_id}", response_model=WebhookRead)
async def update_webhook(
    webhook_id: str, body: WebhookUpdate, admin: AdminDep, webhooks: WebhooksDep
) -> WebhookRead:
    """Change the fields given; `enabled: true` also re-enables a disabled subscription."""
    changes: dict[str, Any] = body.model_dump(exclude_unset=True)
    for field in ("url", "name", "events", "headers", "enabled"):
        if field in changes and changes[field] is None:
            changes.pop(field)  # null means "leave as is" for fields that cannot be empty
    return WebhookRead.of(await webhooks.update(webhook_id, **changes))


@router.delete("/{webhook_id}", response_model=WebhookDeleted)
async def delete_webhook(webhook_id: str, admin: AdminDep, webhooks: WebhooksDep) -> WebhookDeleted:
    """Remove a subscription and its delivery log."""
    await webhooks.delete(webhook_id)
    return WebhookDeleted(id=webhook_id)


@router.post("/{webhook_id}/rotate-secret", response_model=WebhookWithSecret)
async def rotate_secret(
    webhook_id: str, admin: AdminDep, webhooks: WebhooksDep
) -> WebhookWithSecret:
    """A new signing secret (shown once); the old one keeps signing during the overlap."""
    webhook, secret = await webhooks.rotate_secret(webhook_id)
    return WebhookWithSecret.with_secret(webhook, secret)


@router.post("/{webhook_id}/ping", response_model=DeliveryRead, status_code=202)
async def ping_webhook(webhook_id: str, admin: AdminDep, webhooks: WebhooksDep) -> DeliveryRead:
    """Send a `webhook.ping` test event to this subscription."""
    return DeliveryRead.of(await webhooks.ping(webhook_id))


@router.get("/{webhook_id}/deliveries", response_model=DeliveryList)
async def list_deliveries(
    webhook_id: str,
    admin: AdminDep,
    webhooks: WebhooksDep,
    status: DeliveryStatus | None = None,
    event_type: str | None = None,
    created_after: AwareDatetime | None = None,
    created_before: AwareDatetime | None = None,
    limit: PageLimit = 20,
    after: PageAfter = None,
) -> DeliveryList:
    """The delivery log of a subscription, newest first."""
    page = await webhooks.list_deliveries(
        webhook_id,
        status=status,
        event_type=event_type,
        created_after=created_after,
        created_before=created_before,
        limit=limit,
        after=after,
    )
    return DeliveryList.of(page, DeliveryRead.of)


@router.get("/{webhook_id}/deliveries/{delivery_id}", response_model=DeliveryRead)
async def get_delivery(
    webhook_id: str, delivery_id: str, admin: AdminDep, webhooks: WebhooksDep
) -> DeliveryRead:
    """One delivery with every attempt."""
    return DeliveryRead.of(await webhooks.get_delivery(webhook_id, delivery_id))


@router.post(
    "/{webhook_id}/deliveries/{delivery_id}/replay", response_model=DeliveryRead, status_code=202
)
async def replay_delivery(
    webhook_id: str, delivery_id: str, admin: AdminDep, webhooks: WebhooksDep
) -> DeliveryRead:
    """Send a delivery again with the same `webhook-id`, on a fresh retry schedule."""
    return DeliveryRead.of(await webhooks.replay(webhook_id, delivery_id))


@router.post("/{webhook_id}/replay", response_model=ReplayResult, status_code=202)
async def replay_failed(
    webhook_id: str, body: ReplayRange, admin: AdminDep, webhooks: WebhooksDep
) -> ReplayResult:
    """Replay every failed or exhausted delivery created in a range (up to 1000 per call)."""
    ids = await webhooks.replay_failed(webhook_id, since=body.since, until=body.until)
    return ReplayResult(replayed=len(ids), delivery_ids=ids)

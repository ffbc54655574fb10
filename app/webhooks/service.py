"""Webhook subscriptions, the event sink that fans events out to them, and signed delivery."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import orjson

from app.core import tracing
from app.core.clock import utcnow
from app.core.crypto import SecretBox, UndecryptableSecret
from app.core.errors import (
    Conflict,
    DomainError,
    InvalidInput,
    NotFound,
    RetryLater,
    StaleVersion,
)
from app.core.ids import check_prefixed, new_id
from app.core.invalidation import ALL, InvalidatedCache, InvalidationBus
from app.core.metrics import WEBHOOK_DELIVERIES
from app.core.outbound import ForbiddenDestination, OutboundClient, OutboundFailed
from app.operations.entities import Operation
from app.operations.submit import JobSubmitter, Owner
from app.operations.transitions import TERMINAL
from app.queue.names import OperationKind
from app.storage.protocol import Page, Storage, UnitOfWork, Where, given
from app.storage.reads import delete_existing, get_existing, read_page
from app.webhooks import catalogue
from app.webhooks.entities import DeliveryStatus, Webhook, WebhookDelivery, WebhookStatus
from app.webhooks.schemas import MASKED_HEADER
from app.webhooks.signing import new_secret, secret_key, signature_header

log = logging.getLogger(__name__)

WEBHOOK_PREFIX = "wh"
DELIVERY_PREFIX = "dlv"
EVENT_PREFIX = "evt"
SYSTEM = Owner(key_id=None)
EXCERPT_CHARS = 1000
LOG_EXCERPT_CHARS = 300
MAX_HEADERS = 20
REPLAY_LIMIT = 1000
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,100}$")
# Subscription changes are announced on this topic; the interest cache keeps this long otherwise.
WEBHOOKS_TOPIC = "webhooks"
INTEREST_SECONDS = 60.0
# Headers the gateway sets itself; a subscription may not override them.
RESERVED_HEADERS = frozenset(
    {
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
        "content-type",
        "content-length",
        "content-encoding",
        "transfer-encoding",
        "host",
        "connection",
        "user-agent",
    }
)
UNSET: Any = object()
# Custom header values are stored as this mark followed by their ciphertext; a value without
# it was stored in clear before values were encrypted, and is sent as it is.
ENCRYPTED_HEADER = "secretbox:"


class DeliveryAbandoned(DomainError):
    """A delivery that will not be attempted again on its own (replay can still send it)."""

    code = "delivery_failed"


@dataclass(frozen=True)
class WebhookConfig:
    """How deliveries are paced: the retry schedule, timeouts, when to give up on an endpoint."""

    schedule: tuple[float, ...] = (0, 5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400)
    timeout: float = 15.0
    disable_after: float = 5 * 24 * 3600.0
    rotation_overlap: float = 24 * 3600.0
    retention: float = 30 * 24 * 3600.0


@dataclass(frozen=True)
class AttemptOutcome:
    status_code: int | None
    excerpt: str | None
    duration_ms: float
    error: str | None
    # Whether trying again can help (a refused address or a 410 will not change on its own).
    retryable: bool

    @property
    def succeeded(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def check_webhook_id(value: str) -> str:
    return check_prefixed("webhook", WEBHOOK_PREFIX, value, param="webhook_id")


def check_delivery_id(value: str) -> str:
    return check_prefixed("delivery", DELIVERY_PREFIX, value, param="delivery_id")


def check_events(events: list[str]) -> list[str]:
    """The subscribed types, deduplicated; each a known type, `*` or `<group>.*`."""
    known_groups = catalogue.groups()
    for index, name in enumerate(events):
        if name == catalogue.WILDCARD or name in catalogue.EVENT_TYPES:
            continue
        if name.endswith(".*") and name[:-2] in known_groups:
            continue
        raise InvalidInput(
            f"unknown event type '{name}' (see GET /admin/webhooks/event-types)",
            param=f"events.{index}",
        )
    return list(dict.fromkeys(events))


def check_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Custom headers: valid names, single-line values, none the gateway sets itself."""
    if len(headers) > MAX_HEADERS:
        raise InvalidInput(f"at most {MAX_HEADERS} custom headers", param="headers")
    for name, value in headers.items():
        if not _HEADER_NAME.match(name):
            raise InvalidInput(f"'{name}' is not a valid header name", param=f"headers.{name}")
        if name.lower() in RESERVED_HEADERS:
            raise InvalidInput(
                f"the header '{name}' is set by the gateway", param=f"headers.{name}"
            )
        if "\r" in value or "\n" in value or len(value) > 1000:
            raise InvalidInput(
                "header values are single lines of at most 1000 characters",
                param=f"headers.{name}",
            )
    return dict(headers)


def masked(text: str, values: Iterable[str]) -> str:
    """`text` with each header value, and each long word of one (the token after `Bearer`),
    shown as `***`: an endpoint that echoes its request must not make them readable in the
    delivery log. Values under 4 characters are left, as they hide nothing and `***` in their
    place would garble the excerpt."""
    hidden: set[str] = set()
    for value in values:
        hidden.add(value)
        hidden.update(word for word in value.split() if len(word) >= 8)
    for value in sorted((v for v in hidden if len(v) >= 4), key=len, reverse=True):
        text = text.replace(value, "***")
    return text


@dataclass(frozen=True)
class WebhookRotation:
    """How many webhook values `rotate_webhook_secrets` rewrote under the newest key."""

    secrets: int = 0  # signing secrets, current and previous
    header_values: int = 0


def seal_header(box: SecretBox, stored: str) -> str:
    """A stored header value encrypted under the newest key (a clear-text one is encrypted)."""
    if stored.startswith(ENCRYPTED_HEADER):
        return ENCRYPTED_HEADER + box.rotate(stored[len(ENCRYPTED_HEADER) :])
    return ENCRYPTED_HEADER + box.encrypt(stored)


async def rotate_webhook_secrets(storage: Storage, box: SecretBox) -> WebhookRotation:
    """Re-encrypt every webhook's secrets and header values under the newest key.

    Each webhook is rewritten in its own unit of work, so an interrupted run keeps what it did
    and running it again is harmless; a webhook a delivery changed meanwhile is read again.
    """
    total = WebhookRotation()
    after: str | None = None
    while True:
        async with storage.unit_of_work() as uow:
            page = await uow.repo(Webhook).find(order_by=["id"], limit=100, after=after)
        for webhook in page.items:
            done = await _rotate_webhook(storage, box, webhook)
            total = WebhookRotation(
                total.secrets + done.secrets, total.header_values + done.header_values
            )
        if page.next_cursor is None:
            return total
        after = page.next_cursor


async def _rotate_webhook(
    storage: Storage, box: SecretBox, webhook: Webhook | None
) -> WebhookRotation:
    while webhook is not None:
        previous = webhook.previous_secret_encrypted
        webhook.secret_encrypted = box.rotate(webhook.secret_encrypted)
        webhook.previous_secret_encrypted = box.rotate(previous) if previous else None
        webhook.headers = {name: seal_header(box, v) for name, v in webhook.headers.items()}
        try:
            async with storage.unit_of_work() as uow:
                await uow.repo(Webhook).update(webhook)
                await uow.commit()
            return WebhookRotation(1 + (previous is not None), len(webhook.headers))
        except StaleVersion:
            async with storage.unit_of_work() as uow:
                webhook = await uow.repo(Webhook).get(webhook.id)
        except NotFound:
            break
    return WebhookRotation()


async def _webhook(uow: UnitOfWork, webhook_id: str) -> Webhook:
    """The subscription a request names, or `NotFound` pointing at `webhook_id`."""
    return await get_existing(uow.repo(Webhook), webhook_id, "webhook", param="webhook_id")


class WebhookService:
    """Subscriptions, events and deliveries; it is also the `EventSink` of the gateway."""

    def __init__(
        self,
        storage: Storage,
        jobs: JobSubmitter,
        box: SecretBox,
        client: OutboundClient,
        config: WebhookConfig | None = None,
        *,
        bus: InvalidationBus | None = None,
    ) -> None:
        """`jobs` submits the delivery jobs. With `bus`, which events active subscriptions want
        is cached, dropped on every subscription change in any process (`interested` is then
        free for the events no one wants)."""
        self._storage = storage
        self._jobs = jobs
        self._box = box
        self._client = client
        self.config = config or WebhookConfig()
        self._bus = bus
        self._interest: InvalidatedCache[list[list[str]]] | None = (
            InvalidatedCache(bus, WEBHOOKS_TOPIC, ttl=INTEREST_SECONDS) if bus is not None else None
        )

    async def _changed(self) -> None:
        if self._bus is not None:
            await self._bus.publish(WEBHOOKS_TOPIC)

    # ---- subscriptions ---------------------------------------------------------------------

    async def create(
        self,
        *,
        url: str,
        name: str | None = None,
        description: str | None = None,
        events: list[str] | None = None,
        headers: Mapping[str, str] | None = None,
        enabled: bool = True,
        secret: str | None = None,
    ) -> tuple[Webhook, str]:
        """Create a subscription; returns it with its secret, which is never shown again."""
        self._client.policy.check_url(url)
        if secret is not None:
            secret_key(secret)
        secret = secret or new_secret()
        webhook = Webhook(
            id=new_id(WEBHOOK_PREFIX),
            name=name or urlsplit(url).hostname or url,
            description=description,
            url=url,
            secret_encrypted=self._box.encrypt(secret),
            events=check_events(events or []),
            headers=self._sealed_headers(check_headers(headers or {}), {}),
            status=WebhookStatus.ACTIVE if enabled else WebhookStatus.PAUSED,
        )
        async with self._storage.unit_of_work() as uow:
            webhook = await uow.repo(Webhook).add(webhook)
            await uow.commit()
        await self._changed()
        return webhook, secret

    async def get(self, webhook_id: str) -> Webhook:
        check_webhook_id(webhook_id)
        async with self._storage.unit_of_work() as uow:
            return await _webhook(uow, webhook_id)

    async def list_webhooks(self, *, limit: int = 20, after: str | None = None) -> Page[Webhook]:
        """Subscriptions, newest first."""
        return await read_page(
            self._storage, Webhook, order_by=["-created_at"], limit=limit, after=after
        )

    async def update(
        self,
        webhook_id: str,
        *,
        url: str = UNSET,
        name: str = UNSET,
        description: str | None = UNSET,
        events: list[str] = UNSET,
        headers: Mapping[str, str] = UNSET,
        enabled: bool = UNSET,
    ) -> Webhook:
        """Change what is given; enabling a disabled subscription clears its failure record."""
        check_webhook_id(webhook_id)
        if url is not UNSET:
            self._client.policy.check_url(url)
        changes: dict[str, Any] = {}
        if url is not UNSET:
            changes["url"] = url
        if name is not UNSET:
            changes["name"] = name
        if description is not UNSET:
            changes["description"] = description
        if events is not UNSET:
            changes["events"] = check_events(events)
        if headers is not UNSET:
            headers = check_headers(headers)

        def change(webhook: Webhook) -> None:
            for field, value in changes.items():
                setattr(webhook, field, value)
            if headers is not UNSET:
                webhook.headers = self._sealed_headers(headers, webhook.headers)
            if enabled is UNSET:
                return
            if not enabled:
                if webhook.status == WebhookStatus.ACTIVE:
                    webhook.status = WebhookStatus.PAUSED
                return
            if webhook.status != WebhookStatus.ACTIVE:
                webhook.status = WebhookStatus.ACTIVE
                webhook.disabled_reason = None
                webhook.failing_since = None
                webhook.failure_count = 0

        return await self._change(webhook_id, change)

    def _sealed_headers(
        self, headers: Mapping[str, str], stored: Mapping[str, str]
    ) -> dict[str, str]:
        """`headers` as stored: each value encrypted; a masked one keeps its `stored` value."""
        sealed: dict[str, str] = {}
        for name, value in headers.items():
            if value != MASKED_HEADER:
                sealed[name] = ENCRYPTED_HEADER + self._box.encrypt(value)
            elif name in stored:
                sealed[name] = self._sealed(stored[name])
            else:
                raise InvalidInput(
                    f"the header '{name}' has no stored value to keep: send its value",
                    param=f"headers.{name}",
                )
        return sealed

    def _sealed(self, stored: str) -> str:
        if stored.startswith(ENCRYPTED_HEADER):
            return stored
        return ENCRYPTED_HEADER + self._box.encrypt(stored)

    def _header_values(self, webhook: Webhook) -> dict[str, str]:
        """The custom headers to send, decrypted (`UndecryptableSecret` if a key is missing)."""
        return {
            name: self._box.decrypt(value[len(ENCRYPTED_HEADER) :])
            if value.startswith(ENCRYPTED_HEADER)
            else value
            for name, value in webhook.headers.items()
        }

    async def delete(self, webhook_id: str) -> None:
        """Remove a subscription and its delivery log; its pending deliveries are dropped."""
        check_webhook_id(webhook_id)
        async with self._storage.unit_of_work() as uow:
            await delete_existing(uow.repo(Webhook), webhook_id, "webhook", param="webhook_id")
            await uow.commit()
        await self._changed()

    async def rotate_secret(self, webhook_id: str) -> tuple[Webhook, str]:
        """A new secret (returned once); the old one keeps signing during the overlap."""
        secret = new_secret()
        expires = utcnow() + timedelta(seconds=self.config.rotation_overlap)

        def change(webhook: Webhook) -> None:
            webhook.previous_secret_encrypted = webhook.secret_encrypted
            webhook.previous_secret_expires_at = expires
            webhook.secret_encrypted = self._box.encrypt(secret)

        return await self._change(webhook_id, change), secret

    async def ping(self, webhook_id: str) -> WebhookDelivery:
        """Send a `webhook.ping` event to this subscription only, whatever it subscribes to."""
        check_webhook_id(webhook_id)
        async with self._storage.unit_of_work() as uow:
            webhook = await _webhook(uow, webhook_id)
            event = self._event(catalogue.PING, {"webhook_id": webhook_id})
            delivery = await self._stage(uow, webhook, event)
            await uow.commit()
        return delivery

    async def _change(self, webhook_id: str, change: Any) -> Webhook:
        check_webhook_id(webhook_id)
        while True:
            try:
                async with self._storage.unit_of_work() as uow:
                    webhook = await _webhook(uow, webhook_id)
                    change(webhook)
                    webhook = await uow.repo(Webhook).update(webhook)
                    await uow.commit()
                await self._changed()
                return webhook
            except StaleVersion:
                continue  # a delivery recorded its outcome meanwhile; apply ours on top

    # ---- events ----------------------------------------------------------------------------

    async def interested(self, event_type: str) -> bool:
        """Whether an active subscription wants `event_type` (from the cache when watching)."""
        if self._interest is None:
            return True  # `record` reads the subscriptions in its unit of work and decides
        patterns = self._interest.get(ALL)
        if patterns is None:
            generation = self._interest.generation
            async with self._storage.unit_of_work() as uow:
                hooks = await uow.repo(Webhook).find(Where.eq("status", WebhookStatus.ACTIVE))
            patterns = [list(h.events) for h in hooks.items]
            self._interest.fill(ALL, patterns, generation)
        return any(catalogue.matches(events, event_type) for events in patterns)

    async def record(self, uow: UnitOfWork, event_type: str, data: dict[str, Any]) -> None:
        """Inside the caller's `uow`: one delivery (and its job) per interested subscription."""
        hooks = await uow.repo(Webhook).find(Where.eq("status", WebhookStatus.ACTIVE))
        interested = [h for h in hooks.items if catalogue.matches(h.events, event_type)]
        if not interested:
            return
        event = self._event(event_type, data)
        for webhook in interested:
            await self._stage(uow, webhook, event)

    @staticmethod
    def _event(event_type: str, data: dict[str, Any]) -> dict[str, Any]:
        now = utcnow()
        return {
            "id": new_id(EVENT_PREFIX),
            "type": event_type,
            "timestamp": now.isoformat().replace("+00:00", "Z"),
            "data": data,
        }

    async def _stage(
        self, uow: UnitOfWork, webhook: Webhook, event: dict[str, Any]
    ) -> WebhookDelivery:
        delivery = WebhookDelivery(
            id=new_id(DELIVERY_PREFIX),
            webhook_id=webhook.id,
            event_id=event["id"],
            event_type=event["type"],
            payload=event,
            status=DeliveryStatus.PENDING,
            next_attempt_at=utcnow(),
        )
        delivery.operation_id = (await self._submit(uow, delivery)).id
        return await uow.repo(WebhookDelivery).add(delivery)

    async def _submit(self, uow: UnitOfWork, delivery: WebhookDelivery) -> Operation:
        return await self._jobs.submit_in(
            uow,
            kind=OperationKind.WEBHOOK_DELIVERY,
            input={"delivery_id": delivery.id},
            owner=SYSTEM,
            max_attempts=len(self.config.schedule),
            meta={"webhook_id": delivery.webhook_id, "event_type": delivery.event_type},
        )

    # ---- the delivery log and replay -------------------------------------------------------

    async def list_deliveries(
        self,
        webhook_id: str,
        *,
        status: DeliveryStatus | None = None,
        event_type: str | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        limit: int = 20,
        after: str | None = None,
    ) -> Page[WebhookDelivery]:
        """A subscription's deliveries, newest first."""
        await self.get(webhook_id)
        where = given(
            Where.eq("webhook_id", webhook_id),
            Where.eq("status", status),
            Where.eq("event_type", event_type),
            Where.ge("created_at", created_after),
            Where.lt("created_at", created_before),
        )
        return await read_page(
            self._storage,
            WebhookDelivery,
            *where,
            order_by=["-created_at"],
            limit=limit,
            after=after,
        )

    async def get_delivery(self, webhook_id: str, delivery_id: str) -> WebhookDelivery:
        check_webhook_id(webhook_id)
        check_delivery_id(delivery_id)
        async with self._storage.unit_of_work() as uow:
            delivery = await uow.repo(WebhookDelivery).get(delivery_id)
        if delivery is None or delivery.webhook_id != webhook_id:
            raise NotFound("delivery", delivery_id, param="delivery_id")
        return delivery

    async def replay(self, webhook_id: str, delivery_id: str) -> WebhookDelivery:
        """Send a delivery again (same `webhook-id`), restarting its retry schedule."""
        await self.get_delivery(webhook_id, delivery_id)
        async with self._storage.unit_of_work() as uow:
            webhook = await self._replayable_webhook(uow, webhook_id)
            delivery = await get_existing(
                uow.repo(WebhookDelivery), delivery_id, "delivery", param="delivery_id"
            )
            if await self._in_flight(uow, delivery):
                raise Conflict(
                    f"delivery '{delivery_id}' is still being attempted; replay it once it "
                    "has succeeded or failed",
                    param="delivery_id",
                )
            delivery = await self._restart(uow, webhook, delivery)
            await uow.commit()
        return delivery

    async def replay_failed(
        self, webhook_id: str, *, since: datetime, until: datetime | None = None
    ) -> list[str]:
        """Replay every failed or exhausted delivery created in [since, until); their ids."""
        await self.get(webhook_id)
        where = [
            Where.eq("webhook_id", webhook_id),
            Where.in_("status", [DeliveryStatus.FAILED, DeliveryStatus.EXHAUSTED]),
            Where.ge("created_at", since),
        ]
        if until is not None:
            where.append(Where.lt("created_at", until))
        replayed: list[str] = []
        async with self._storage.unit_of_work() as uow:
            webhook = await self._replayable_webhook(uow, webhook_id)
            found = await uow.repo(WebhookDelivery).find(
                *where, order_by=["created_at"], limit=REPLAY_LIMIT
            )
            for delivery in found.items:
                if await self._in_flight(uow, delivery):
                    continue  # its retries are still running: they will deliver it
                await self._restart(uow, webhook, delivery)
                replayed.append(delivery.id)
            await uow.commit()
        return replayed

    async def _replayable_webhook(self, uow: UnitOfWork, webhook_id: str) -> Webhook:
        webhook = await _webhook(uow, webhook_id)
        if webhook.status != WebhookStatus.ACTIVE:
            raise Conflict(
                f"webhook '{webhook_id}' is {webhook.status.value}; enable it before replaying",
                param="webhook_id",
            )
        return webhook

    @staticmethod
    async def _in_flight(uow: UnitOfWork, delivery: WebhookDelivery) -> bool:
        if delivery.operation_id is None:
            return False
        job = await uow.repo(Operation).get(delivery.operation_id)
        return job is not None and job.status not in TERMINAL

    async def _restart(
        self, uow: UnitOfWork, webhook: Webhook, delivery: WebhookDelivery
    ) -> WebhookDelivery:
        delivery.status = DeliveryStatus.PENDING
        delivery.next_attempt_at = utcnow()
        delivery.completed_at = None
        delivery.operation_id = (await self._submit(uow, delivery)).id
        return await uow.repo(WebhookDelivery).update(delivery)

    async def purge_deliveries(self) -> int:
        """Remove finished deliveries older than the retention; returns how many."""
        cutoff = utcnow() - timedelta(seconds=self.config.retention)
        async with self._storage.unit_of_work() as uow:
            removed = await uow.repo(WebhookDelivery).delete_where(
                Where.in_(
                    "status",
                    [DeliveryStatus.SUCCEEDED, DeliveryStatus.FAILED, DeliveryStatus.EXHAUSTED],
                ),
                # A failed delivery with a retry still to come is not finished.
                Where.is_null("next_attempt_at"),
                Where.lt("created_at", cutoff),
            )
            await uow.commit()
        return removed

    # ---- delivering (the `webhook_delivery` job) -------------------------------------------

    async def deliver(
        self, delivery_id: str, *, operation_id: str, attempt: int, max_attempts: int
    ) -> dict[str, Any]:
        """Make one attempt at a delivery and record it.

        Raises `RetryLater` with the schedule's next delay when another attempt is due, and
        `DeliveryAbandoned` when none is. Counted by outcome in `gateway_webhook_deliveries_total`,
        and traced as a `webhook.delivery` span (ids, event type, status code: never the URL).
        """
        with tracing.span("webhook.delivery", kind="client") as span:
            span.set_attribute("gateway.webhook.delivery_id", delivery_id)
            span.set_attribute("gateway.webhook.attempt", attempt)
            try:
                result = await self._deliver(
                    delivery_id,
                    operation_id=operation_id,
                    attempt=attempt,
                    max_attempts=max_attempts,
                    span=span,
                )
            except RetryLater:
                WEBHOOK_DELIVERIES("retry").inc()
                span.set_attribute("gateway.webhook.outcome", "retry")
                raise
            except DeliveryAbandoned:
                WEBHOOK_DELIVERIES("abandoned").inc()
                span.set_attribute("gateway.webhook.outcome", "abandoned")
                raise
            outcome = "skipped" if "skipped" in result else "succeeded"
            WEBHOOK_DELIVERIES(outcome).inc()
            span.set_attribute("gateway.webhook.outcome", outcome)
        return result

    async def _deliver(
        self,
        delivery_id: str,
        *,
        operation_id: str,
        attempt: int,
        max_attempts: int,
        span: tracing.SpanHandle = tracing.NO_SPAN,
    ) -> dict[str, Any]:
        async with self._storage.unit_of_work() as uow:
            delivery = await uow.repo(WebhookDelivery).get(delivery_id)
            webhook = await uow.repo(Webhook).get(delivery.webhook_id) if delivery else None
        if delivery is None or webhook is None:
            return {"skipped": "the delivery or its webhook was deleted"}
        if delivery.operation_id != operation_id:
            return {"skipped": "a replay superseded this job"}
        if delivery.status == DeliveryStatus.SUCCEEDED:
            # An earlier attempt of this job succeeded but its worker died before finishing.
            return {"delivery_id": delivery.id, "status_code": delivery.response_status}
        if webhook.status != WebhookStatus.ACTIVE and delivery.event_type != catalogue.PING:
            reason = f"webhook {webhook.status.value}: not sent"
            await self._record(delivery, webhook, None, attempt=attempt, abandon=reason)
            raise DeliveryAbandoned(reason)
        span.set_attribute("gateway.webhook.id", webhook.id)
        span.set_attribute("gateway.webhook.event_type", delivery.event_type)
        outcome = await self._attempt(webhook, delivery)
        if outcome.status_code is not None:
            span.set_attribute("http.response.status_code", outcome.status_code)
        retry_in = self._next_delay(attempt, max_attempts) if outcome.retryable else None
        try:
            delivery = await self._record(
                delivery, webhook, outcome, attempt=attempt, retry_in=retry_in
            )
        except NotFound:
            return {"skipped": "the webhook was deleted during the attempt"}
        if outcome.succeeded:
            return {"delivery_id": delivery.id, "status_code": outcome.status_code}
        message = outcome.error or f"the endpoint answered HTTP {outcome.status_code}"
        if retry_in is not None:
            raise RetryLater(message, retry_after=retry_in)
        if delivery.status == DeliveryStatus.EXHAUSTED:
            message = f"{message} (gave up after {delivery.attempts} attempts)"
        raise DeliveryAbandoned(message)

    def _next_delay(self, attempt: int, max_attempts: int) -> float | None:
        if attempt >= max_attempts or attempt >= len(self.config.schedule):
            return None
        return self.config.schedule[attempt]

    def _signing_secrets(self, webhook: Webhook) -> list[str]:
        secrets = [self._box.decrypt(webhook.secret_encrypted)]
        expires = webhook.previous_secret_expires_at
        if webhook.previous_secret_encrypted and expires is not None and expires > utcnow():
            secrets.append(self._box.decrypt(webhook.previous_secret_encrypted))
        return secrets

    async def _attempt(self, webhook: Webhook, delivery: WebhookDelivery) -> AttemptOutcome:
        started = time.perf_counter()

        def elapsed() -> float:
            return round((time.perf_counter() - started) * 1000, 1)

        body = orjson.dumps(delivery.payload)
        timestamp = int(time.time())
        try:
            signature = signature_header(
                self._signing_secrets(webhook), delivery.event_id, timestamp, body
            )
        except (UndecryptableSecret, InvalidInput):
            return AttemptOutcome(
                None, None, elapsed(), "the webhook secret cannot be read (SECRET_KEY)", False
            )
        try:
            custom = self._header_values(webhook)
        except UndecryptableSecret:
            return AttemptOutcome(
                None, None, elapsed(), "the webhook headers cannot be read (SECRET_KEY)", False
            )
        headers = {
            **custom,
            "content-type": "application/json",
            "webhook-id": delivery.event_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature,
        }
        try:
            response = await self._client.request(
                "POST",
                webhook.url,
                content=body,
                headers=headers,
                timeout=self.config.timeout,
                max_response_bytes=EXCERPT_CHARS * 4,
                truncate=True,
            )
        except ForbiddenDestination as exc:
            return AttemptOutcome(None, None, elapsed(), exc.message, False)
        except OutboundFailed as exc:
            return AttemptOutcome(None, None, elapsed(), exc.message, True)
        status = response.status_code
        excerpt = masked(response.text(), custom.values())[:EXCERPT_CHARS]
        if 200 <= status < 300:
            return AttemptOutcome(status, excerpt, response.elapsed_ms, None, False)
        if status == 410:
            return AttemptOutcome(
                status, excerpt, response.elapsed_ms, "the endpoint answered 410 Gone", False
            )
        error = f"the endpoint answered HTTP {status}"
        return AttemptOutcome(status, excerpt, response.elapsed_ms, error, True)

    async def _record(
        self,
        delivery: WebhookDelivery,
        webhook: Webhook,
        outcome: AttemptOutcome | None,
        *,
        attempt: int,
        retry_in: float | None = None,
        abandon: str | None = None,
    ) -> WebhookDelivery:
        """Write the attempt on the delivery and its effect on the webhook, in one unit.

        It starts from the rows read before the attempt; their versions catch any change made
        meanwhile, and only then are they read again.
        """
        while True:
            status = webhook.status
            try:
                async with self._storage.unit_of_work() as uow:
                    now = utcnow()
                    if outcome is None:
                        delivery.status = DeliveryStatus.FAILED
                        delivery.error = abandon
                        delivery.next_attempt_at = None
                    else:
                        self._apply(delivery, outcome, attempt, retry_in, now)
                        if self._judge(webhook, outcome, now):
                            await uow.repo(Webhook).update(webhook)
                    delivery = await uow.repo(WebhookDelivery).update(delivery)
                    await uow.commit()
                if webhook.status != status:
                    await self._changed()  # disabled: its events are no longer wanted
                return delivery
            except StaleVersion:
                # Another delivery to the same webhook wrote first: apply ours to theirs.
                async with self._storage.unit_of_work() as uow:
                    fresh = await uow.repo(WebhookDelivery).get(delivery.id)
                    hook = await uow.repo(Webhook).get(webhook.id)
                if fresh is None or hook is None:
                    raise NotFound("delivery", delivery.id) from None
                delivery, webhook = fresh, hook

    @staticmethod
    def _apply(
        delivery: WebhookDelivery,
        outcome: AttemptOutcome,
        attempt: int,
        retry_in: float | None,
        now: datetime,
    ) -> None:
        delivery.attempts += 1
        delivery.last_attempt_at = now
        delivery.response_status = outcome.status_code
        delivery.response_excerpt = outcome.excerpt
        delivery.error = outcome.error
        delivery.attempt_log = [
            *delivery.attempt_log,
            {
                "attempt": delivery.attempts,
                "job_attempt": attempt,
                "at": now.isoformat(),
                "status_code": outcome.status_code,
                "duration_ms": outcome.duration_ms,
                "response_excerpt": (outcome.excerpt or "")[:LOG_EXCERPT_CHARS] or None,
                "error": outcome.error,
            },
        ]
        if outcome.succeeded:
            delivery.status = DeliveryStatus.SUCCEEDED
            delivery.completed_at = now
            delivery.next_attempt_at = None
        elif retry_in is not None:
            delivery.status = DeliveryStatus.FAILED
            delivery.next_attempt_at = now + timedelta(seconds=retry_in)
        else:
            # A failure that retrying could fix, with no retry left, used up the schedule.
            delivery.status = (
                DeliveryStatus.EXHAUSTED if outcome.retryable else DeliveryStatus.FAILED
            )
            delivery.next_attempt_at = None

    def _judge(self, webhook: Webhook, outcome: AttemptOutcome, now: datetime) -> bool:
        """Track the endpoint's health (410 or failing for too long disables it); changed?"""
        if outcome.succeeded:
            recent = webhook.last_success_at and now - webhook.last_success_at < timedelta(
                seconds=60
            )
            # Skipped when nothing changes, so busy endpoints do not make one row a hot spot.
            if webhook.failure_count == 0 and webhook.failing_since is None and recent:
                return False
            webhook.failure_count = 0
            webhook.failing_since = None
            webhook.last_success_at = now
            return True
        webhook.failure_count += 1
        webhook.last_failure_at = now
        webhook.failing_since = webhook.failing_since or now
        if webhook.status == WebhookStatus.ACTIVE:
            if outcome.status_code == 410:
                webhook.status = WebhookStatus.DISABLED
                webhook.disabled_reason = "the endpoint answered 410 Gone"
            elif now - webhook.failing_since >= timedelta(seconds=self.config.disable_after):
                webhook.status = WebhookStatus.DISABLED
                webhook.disabled_reason = (
                    f"every delivery failed since {webhook.failing_since.isoformat()}"
                )
            if webhook.status == WebhookStatus.DISABLED:
                log.warning("webhook %s disabled: %s", webhook.id, webhook.disabled_reason)
        return True

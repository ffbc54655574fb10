"""Deliveries end to end on both backends: a real receiver, the job engine, the delivery log."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import orjson
import pytest

from app.core.clock import utcnow
from app.core.crypto import SecretBox
from app.core.errors import Conflict, InvalidInput
from app.core.outbound import OutboundClient, OutboundPolicy
from app.credentials.entities import Provider
from app.credentials.schemas import CredentialCreate
from app.credentials.service import CredentialService
from app.operations.entities import Operation, OperationStatus
from app.operations.runner import JobContext, JobTimings, OperationRunner
from app.operations.service import OperationService
from app.operations.submit import Owner
from app.queue.names import OperationKind
from app.storage.protocol import Storage, Where
from app.webhooks.entities import DeliveryStatus, Webhook, WebhookDelivery, WebhookStatus
from app.webhooks.jobs import webhook_handlers
from app.webhooks.schemas import DeliveryRead
from app.webhooks.service import WebhookConfig, WebhookService, rotate_webhook_secrets
from tests.webhooks.receiver import InvalidSignature, Received, Receiver, Reply, verify

FAST = JobTimings(lease=2, heartbeat=0.5, retry_base=0.01, retry_max=0.05, resend_after=1)


@dataclass
class TimedQueue:
    """Records sends with the instant each becomes due."""

    sent: list[tuple[float, str]] = field(default_factory=list)

    async def send(self, operation_id: str, kind: OperationKind, *, delay: float = 0.0) -> None:
        self.sent.append((asyncio.get_running_loop().time() + delay, operation_id))

    async def waiting_since(self) -> dict[OperationKind, datetime]:
        return {}


@dataclass
class Rig:
    storage: Storage
    queue: TimedQueue
    operations: OperationService
    webhooks: WebhookService
    runner: OperationRunner
    client: OutboundClient

    async def drain(self, patience: float = 10) -> None:
        """Run every sent job once it is due, until none is left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + patience
        while self.queue.sent:
            self.queue.sent.sort()
            due, operation_id = self.queue.sent.pop(0)
            assert due < deadline, "a job was scheduled beyond the test's patience"
            await asyncio.sleep(max(0.0, due - loop.time()))
            await self.runner.execute(operation_id)

    async def emit(self, event_type: str, data: dict[str, Any]) -> None:
        async with self.storage.unit_of_work() as uow:
            await self.webhooks.record(uow, event_type, data)
            await uow.commit()

    async def deliveries(self, webhook_id: str | None = None) -> list[WebhookDelivery]:
        where = [Where.eq("webhook_id", webhook_id)] if webhook_id else []
        async with self.storage.unit_of_work() as uow:
            page = await uow.repo(WebhookDelivery).find(*where, order_by=["created_at"])
        return page.items


async def echo(ctx: JobContext) -> dict[str, Any]:
    if ctx.operation.input.get("fail"):
        raise ValueError("boom")
    return {"echo": ctx.operation.input}


def make_rig(storage: Storage, box: SecretBox | None = None, **config: Any) -> Rig:
    queue = TimedQueue()
    operations = OperationService(storage, queue)
    client = OutboundClient(OutboundPolicy.parse("127.0.0.1"))
    settings = {"schedule": (0, 0.05, 0.05), "timeout": 2.0, **config}
    webhooks = WebhookService(
        storage, operations.jobs, box or SecretBox(["test-key"]), client, WebhookConfig(**settings)
    )
    operations.events = webhooks
    handlers = webhook_handlers(webhooks)
    handlers[OperationKind.CHAT_COMPLETION] = echo
    runner = OperationRunner(storage, queue, handlers, worker_id="w", timings=FAST, events=webhooks)
    return Rig(storage, queue, operations, webhooks, runner, client)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    server = await Receiver().start()
    yield server
    await server.close()


@pytest.fixture
async def rig(storage: Storage) -> AsyncIterator[Rig]:
    built = make_rig(storage)
    yield built
    await built.client.aclose()


def answers(*replies: Reply) -> Any:
    """Answer with each reply in turn, repeating the last."""
    queue = list(replies)

    async def respond(request: Received) -> Reply:
        return queue.pop(0) if len(queue) > 1 else queue[0]

    return respond


async def test_a_delivery_carries_a_signature_a_standard_verifier_accepts(
    rig: Rig, receiver: Receiver
) -> None:
    webhook, secret = await rig.webhooks.create(
        url=receiver.url, events=["api_key.created"], headers={"X-Tenant": "acme"}
    )
    await rig.emit("api_key.created", {"api_key": {"id": "key-1"}})
    await rig.drain()
    (request,) = receiver.requests
    verify(secret, request.headers, request.body)
    body = orjson.loads(request.body)
    assert body["type"] == "api_key.created" and body["data"] == {"api_key": {"id": "key-1"}}
    assert request.headers["webhook-id"] == body["id"] and body["id"].startswith("evt-")
    assert body["timestamp"].endswith("Z")
    assert request.headers["content-type"] == "application/json"
    assert request.headers["x-tenant"] == "acme"
    (delivery,) = await rig.deliveries(webhook.id)
    assert delivery.status == DeliveryStatus.SUCCEEDED and delivery.attempts == 1
    (entry,) = delivery.attempt_log
    assert entry["status_code"] == 200 and entry["error"] is None
    assert entry["duration_ms"] >= 0 and entry["response_excerpt"] == '{"ok": true}'
    with pytest.raises(InvalidSignature):
        verify("whsec_" + "A" * 32, request.headers, request.body)


TOKEN = "Bearer hook-token-0123456789"


async def stored_headers(storage: Storage, webhook_id: str) -> dict[str, str]:
    async with storage.unit_of_work() as uow:
        webhook = await uow.repo(Webhook).get(webhook_id)
    assert webhook is not None
    return webhook.headers


async def test_header_values_are_stored_encrypted_and_sent_in_clear(
    rig: Rig, receiver: Receiver
) -> None:
    webhook, secret = await rig.webhooks.create(
        url=receiver.url, headers={"Authorization": TOKEN, "X-Tenant": "acme"}
    )
    stored = await stored_headers(rig.storage, webhook.id)
    assert sorted(stored) == ["Authorization", "X-Tenant"]
    assert "hook-token" not in str(stored) and "acme" not in str(stored)
    await rig.emit("api_key.created", {})
    await rig.drain()
    (request,) = receiver.requests
    assert request.headers["authorization"] == TOKEN and request.headers["x-tenant"] == "acme"
    verify(secret, request.headers, request.body)


async def test_headers_stored_in_clear_before_encryption_are_still_sent(
    rig: Rig, receiver: Receiver
) -> None:
    webhook, _ = await rig.webhooks.create(url=receiver.url)
    async with rig.storage.unit_of_work() as uow:
        webhook.headers = {"X-Legacy": "plain-value"}
        await uow.repo(Webhook).update(webhook)
        await uow.commit()
    await rig.emit("api_key.created", {})
    await rig.drain()
    (request,) = receiver.requests
    assert request.headers["x-legacy"] == "plain-value"


async def test_an_update_sending_a_masked_value_keeps_the_stored_one(
    rig: Rig, receiver: Receiver
) -> None:
    webhook, _ = await rig.webhooks.create(url=receiver.url, headers={"Authorization": TOKEN})
    await rig.webhooks.update(webhook.id, headers={"Authorization": "***", "X-New": "fresh"})
    with pytest.raises(InvalidInput) as refused:
        await rig.webhooks.update(webhook.id, headers={"X-Unknown": "***"})
    assert refused.value.param == "headers.X-Unknown"
    assert "fresh" not in str(await stored_headers(rig.storage, webhook.id))
    await rig.emit("api_key.created", {})
    await rig.drain()
    (request,) = receiver.requests
    assert request.headers["authorization"] == TOKEN and request.headers["x-new"] == "fresh"


@pytest.mark.parametrize("status", [200, 500])
async def test_an_endpoint_echoing_the_headers_never_shows_their_values_in_the_delivery_log(
    rig: Rig, receiver: Receiver, status: int
) -> None:
    # A request-inspector endpoint (or one a URL change pointed at) answers with what it got:
    # the values are written once and never read back, through the log either.
    async def echo_headers(request: Received) -> Reply:
        return status, orjson.dumps(request.headers)

    receiver.respond = echo_headers
    webhook, _ = await rig.webhooks.create(
        url=receiver.url, headers={"Authorization": TOKEN, "X-Tenant": "acme-tenant-77"}
    )
    await rig.webhooks.ping(webhook.id)
    await rig.drain()
    (request, *_) = receiver.requests
    assert request.headers["authorization"] == TOKEN
    (delivery,) = await rig.deliveries(webhook.id)
    shown = orjson.dumps(DeliveryRead.of(delivery).model_dump(mode="json")).decode()
    assert "webhook-signature" in shown  # the echo was kept, minus the values
    assert "hook-token" not in shown and "acme-tenant-77" not in shown
    assert '"authorization":"***"' in delivery.response_excerpt.replace(" ", "")


async def test_headers_no_configured_key_can_read_fail_the_delivery_without_retrying(
    storage: Storage, receiver: Receiver
) -> None:
    rig = make_rig(storage)
    try:
        webhook, _ = await rig.webhooks.create(url=receiver.url, headers={"Authorization": TOKEN})
        other_key = "secretbox:" + SecretBox(["another-key"]).encrypt(TOKEN)
        async with storage.unit_of_work() as uow:
            webhook.headers = {"Authorization": other_key}
            await uow.repo(Webhook).update(webhook)
            await uow.commit()
        await rig.emit("api_key.created", {})
        await rig.drain()
    finally:
        await rig.client.aclose()
    assert receiver.requests == []
    (delivery,) = await rig.deliveries(webhook.id)
    assert delivery.status == DeliveryStatus.FAILED and delivery.attempts == 1
    assert delivery.error == "the webhook headers cannot be read (SECRET_KEY)"


async def test_rotation_re_encrypts_every_secret_so_the_old_key_can_be_dropped(
    storage: Storage, receiver: Receiver
) -> None:
    old, both, new = SecretBox(["old"]), SecretBox(["new", "old"]), SecretBox(["new"])
    await CredentialService(storage, old).create(
        CredentialCreate(id="c", provider=Provider.OPENAI, secret="sk-rotated")
    )
    before = make_rig(storage, old, rotation_overlap=3600)
    try:
        webhook, first = await before.webhooks.create(
            url=receiver.url, headers={"Authorization": TOKEN}
        )
        _, second = await before.webhooks.rotate_secret(webhook.id)
        plain, plain_secret = await before.webhooks.create(url=receiver.url, events=["batch.*"])
        async with storage.unit_of_work() as uow:
            plain.headers = {"X-Legacy": "plain-value"}  # stored before values were encrypted
            await uow.repo(Webhook).update(plain)
            await uow.commit()
    finally:
        await before.client.aclose()

    assert await CredentialService(storage, both).rotate_secrets() == 1
    rotated = await rotate_webhook_secrets(storage, both)
    assert (rotated.secrets, rotated.header_values) == (3, 2)
    assert "plain-value" not in str(await stored_headers(storage, plain.id))
    again = await rotate_webhook_secrets(storage, both)  # running it twice is harmless
    assert again == rotated and await CredentialService(storage, both).rotate_secrets() == 1

    assert (await CredentialService(storage, new).reveal("c")).secret == "sk-rotated"
    after = make_rig(storage, new, rotation_overlap=3600)
    try:
        await after.emit("batch.completed", {})
        await after.drain()
    finally:
        await after.client.aclose()
    assert {d.status for d in await after.deliveries()} == {DeliveryStatus.SUCCEEDED}
    (hooked,) = [r for r in receiver.requests if "authorization" in r.headers]
    (legacy,) = [r for r in receiver.requests if "x-legacy" in r.headers]
    verify(first, hooked.headers, hooked.body)
    verify(second, hooked.headers, hooked.body)
    assert hooked.headers["authorization"] == TOKEN
    verify(plain_secret, legacy.headers, legacy.body)
    assert legacy.headers["x-legacy"] == "plain-value"


async def test_events_go_only_to_enabled_subscriptions_of_their_type(
    rig: Rig, receiver: Receiver
) -> None:
    everything, _ = await rig.webhooks.create(url=receiver.url)
    keys, _ = await rig.webhooks.create(url=receiver.url, events=["api_key.*"])
    budgets, _ = await rig.webhooks.create(url=receiver.url, events=["budget.exceeded"])
    paused, _ = await rig.webhooks.create(url=receiver.url, enabled=False)
    await rig.emit("api_key.revoked", {"api_key": {"id": "k"}})
    await rig.drain()
    got = {d.webhook_id for d in await rig.deliveries()}
    assert got == {everything.id, keys.id}
    assert len(receiver.requests) == 2
    assert len({r.headers["webhook-id"] for r in receiver.requests}) == 1
    assert budgets.id not in got and paused.id not in got


async def test_an_event_of_a_rolled_back_change_is_never_delivered(
    rig: Rig, receiver: Receiver
) -> None:
    await rig.webhooks.create(url=receiver.url)
    async with rig.storage.unit_of_work() as uow:
        await rig.webhooks.record(uow, "api_key.created", {"api_key": {"id": "k"}})
        await uow.rollback()
    assert rig.queue.sent == [] and await rig.deliveries() == []


async def test_during_a_rotation_both_secrets_sign(storage: Storage, receiver: Receiver) -> None:
    rig = make_rig(storage, rotation_overlap=3600)
    try:
        webhook, old = await rig.webhooks.create(url=receiver.url)
        _, new = await rig.webhooks.rotate_secret(webhook.id)
        await rig.emit("api_key.created", {})
        await rig.drain()
    finally:
        await rig.client.aclose()
    (request,) = receiver.requests
    assert len(request.headers["webhook-signature"].split(" ")) == 2
    verify(old, request.headers, request.body)
    verify(new, request.headers, request.body)


async def test_after_the_overlap_only_the_new_secret_signs(
    storage: Storage, receiver: Receiver
) -> None:
    rig = make_rig(storage, rotation_overlap=0)
    try:
        webhook, old = await rig.webhooks.create(url=receiver.url)
        _, new = await rig.webhooks.rotate_secret(webhook.id)
        await rig.emit("api_key.created", {})
        await rig.drain()
    finally:
        await rig.client.aclose()
    (request,) = receiver.requests
    verify(new, request.headers, request.body)
    with pytest.raises(InvalidSignature):
        verify(old, request.headers, request.body)


async def test_failed_attempts_follow_the_schedule_with_the_same_webhook_id(
    storage: Storage, receiver: Receiver
) -> None:
    rig = make_rig(storage, schedule=(0, 0.3, 0.6, 0.9))
    receiver.respond = answers((500, b"down"), (502, b""), (503, b""), (204, b""))
    try:
        webhook, _ = await rig.webhooks.create(url=receiver.url)
        await rig.emit("api_key.created", {})
        await rig.drain()
    finally:
        await rig.client.aclose()
    assert len(receiver.requests) == 4
    assert len({r.headers["webhook-id"] for r in receiver.requests}) == 1
    gaps = [b.at - a.at for a, b in zip(receiver.requests, receiver.requests[1:], strict=False)]
    for gap, planned in zip(gaps, (0.3, 0.6, 0.9), strict=True):
        # Never early; late only by the time a loaded machine takes to run the job.
        assert planned - 0.05 <= gap < planned + 1.0, gaps
    (delivery,) = await rig.deliveries(webhook.id)
    assert delivery.status == DeliveryStatus.SUCCEEDED and delivery.attempts == 4
    assert [e["status_code"] for e in delivery.attempt_log] == [500, 502, 503, 204]
    assert delivery.attempt_log[0]["response_excerpt"] == "down"
    assert delivery.attempt_log[0]["error"] == "the endpoint answered HTTP 500"
    hook = await rig.webhooks.get(webhook.id)
    assert hook.failure_count == 0 and hook.failing_since is None
    assert hook.last_success_at is not None


async def test_a_delivery_failing_every_attempt_is_exhausted(rig: Rig, receiver: Receiver) -> None:
    receiver.respond = answers((503, b"busy"))
    webhook, _ = await rig.webhooks.create(url=receiver.url)
    await rig.emit("api_key.created", {})
    await rig.drain()
    (delivery,) = await rig.deliveries(webhook.id)
    assert delivery.status == DeliveryStatus.EXHAUSTED and delivery.attempts == 3
    assert delivery.next_attempt_at is None and len(receiver.requests) == 3
    async with rig.storage.unit_of_work() as uow:
        job = await uow.repo(Operation).get(delivery.operation_id)
    assert job is not None and job.status == OperationStatus.FAILED
    assert job.error_message is not None and "gave up after 3 attempts" in job.error_message
    hook = await rig.webhooks.get(webhook.id)
    assert hook.failure_count == 3 and hook.failing_since is not None
    assert hook.status == WebhookStatus.ACTIVE


async def test_a_410_disables_the_subscription_and_stops_retrying(
    rig: Rig, receiver: Receiver
) -> None:
    receiver.respond = answers((410, b"gone"))
    webhook, _ = await rig.webhooks.create(url=receiver.url)
    await rig.emit("api_key.created", {})
    await rig.drain()
    (delivery,) = await rig.deliveries(webhook.id)
    assert delivery.status == DeliveryStatus.FAILED and delivery.attempts == 1
    hook = await rig.webhooks.get(webhook.id)
    assert hook.status == WebhookStatus.DISABLED and "410" in (hook.disabled_reason or "")
    await rig.emit("api_key.created", {})
    await rig.drain()
    assert len(receiver.requests) == 1
    assert len(await rig.deliveries(webhook.id)) == 1


async def test_a_slow_endpoint_times_out_and_is_retried(
    storage: Storage, receiver: Receiver
) -> None:
    calls = 0

    async def slow_then_fast(request: Received) -> Reply:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(1.5)
        return 200, b"ok"

    receiver.respond = slow_then_fast
    rig = make_rig(storage, timeout=0.3)
    try:
        webhook, _ = await rig.webhooks.create(url=receiver.url)
        await rig.emit("api_key.created", {})
        await rig.drain()
    finally:
        await rig.client.aclose()
    (delivery,) = await rig.deliveries(webhook.id)
    assert delivery.status == DeliveryStatus.SUCCEEDED and delivery.attempts == 2
    first = delivery.attempt_log[0]
    assert first["status_code"] is None and "within 0.3 s" in first["error"]
    assert first["duration_ms"] < 1400  # cut short: the endpoint took 1.5 s


async def test_an_endpoint_failing_longer_than_the_span_is_disabled_and_flagged(
    storage: Storage, receiver: Receiver
) -> None:
    receiver.respond = answers((500, b""))
    rig = make_rig(storage, schedule=(0, 0.2, 0.2, 0.2), disable_after=0.3)
    try:
        webhook, _ = await rig.webhooks.create(url=receiver.url)
        await rig.emit("api_key.created", {})
        await rig.drain()
    finally:
        await rig.client.aclose()
    hook = await rig.webhooks.get(webhook.id)
    assert hook.status == WebhookStatus.DISABLED
    assert (hook.disabled_reason or "").startswith("every delivery failed since")
    (delivery,) = await rig.deliveries(webhook.id)
    # The attempt that crossed the span disabled the endpoint; the next one was not sent.
    assert len(receiver.requests) == 3 and delivery.status == DeliveryStatus.FAILED
    assert delivery.error == "webhook disabled: not sent"


async def test_replaying_one_delivery_sends_it_again_with_the_same_id(
    rig: Rig, receiver: Receiver
) -> None:
    receiver.respond = answers((500, b""), (500, b""), (500, b""), (200, b"ok"))
    webhook, secret = await rig.webhooks.create(url=receiver.url)
    await rig.emit("api_key.created", {})
    await rig.drain()
    (delivery,) = await rig.deliveries(webhook.id)
    assert delivery.status == DeliveryStatus.EXHAUSTED
    replayed = await rig.webhooks.replay(webhook.id, delivery.id)
    assert replayed.status == DeliveryStatus.PENDING
    with pytest.raises(Conflict):
        await rig.webhooks.replay(webhook.id, delivery.id)  # already on its way
    await rig.drain()
    (delivery,) = await rig.deliveries(webhook.id)
    assert delivery.status == DeliveryStatus.SUCCEEDED and delivery.attempts == 4
    assert len({r.headers["webhook-id"] for r in receiver.requests}) == 1
    verify(secret, receiver.requests[-1].headers, receiver.requests[-1].body)


async def test_replaying_a_range_resends_only_failed_deliveries_created_in_it(
    rig: Rig, receiver: Receiver
) -> None:
    webhook, _ = await rig.webhooks.create(url=receiver.url)
    receiver.respond = answers((200, b""))
    await rig.emit("api_key.created", {"n": "ok"})
    await rig.drain()
    receiver.respond = answers((500, b""))
    await rig.emit("api_key.created", {"n": "early"})
    await rig.drain()
    middle = utcnow()
    await rig.emit("api_key.created", {"n": "late"})
    await rig.drain()
    receiver.respond = answers((200, b""))
    before = len(receiver.requests)
    ids = await rig.webhooks.replay_failed(
        webhook.id, since=middle, until=utcnow() + timedelta(seconds=1)
    )
    await rig.drain()
    resent = [orjson.loads(r.body)["data"]["n"] for r in receiver.requests[before:]]
    assert resent == ["late"] and len(ids) == 1
    statuses = {d.payload["data"]["n"]: d.status for d in await rig.deliveries(webhook.id)}
    assert statuses == {
        "ok": DeliveryStatus.SUCCEEDED,
        "early": DeliveryStatus.EXHAUSTED,
        "late": DeliveryStatus.SUCCEEDED,
    }


async def test_a_rerun_of_a_delivery_that_already_succeeded_sends_nothing(
    rig: Rig, receiver: Receiver
) -> None:
    webhook, _ = await rig.webhooks.create(url=receiver.url)
    await rig.emit("api_key.created", {})
    (_, operation_id) = rig.queue.sent[0]
    (delivery,) = await rig.deliveries(webhook.id)
    for _ in range(2):  # as if the worker died after the request, before finishing the job
        await rig.webhooks.deliver(
            delivery.id, operation_id=operation_id, attempt=1, max_attempts=3
        )
    assert len(receiver.requests) == 1


async def test_finished_jobs_emit_operation_events_but_deliveries_do_not(
    rig: Rig, receiver: Receiver
) -> None:
    webhook, _ = await rig.webhooks.create(url=receiver.url, events=["operation.*"])
    owner = Owner(key_id="key-1")
    done, _ = await rig.operations.submit(kind=OperationKind.CHAT_COMPLETION, input={}, owner=owner)
    failed, _ = await rig.operations.submit(
        kind=OperationKind.CHAT_COMPLETION, input={"fail": True}, owner=owner, max_attempts=1
    )
    cancelled, _ = await rig.operations.submit(
        kind=OperationKind.CHAT_COMPLETION, input={}, owner=owner
    )
    await rig.operations.cancel(cancelled.id, owner=owner)
    await rig.drain()
    events = {
        orjson.loads(r.body)["data"]["operation"]["id"]: orjson.loads(r.body)["type"]
        for r in receiver.requests
    }
    assert events == {
        done.id: "operation.completed",
        failed.id: "operation.failed",
        cancelled.id: "operation.cancelled",
    }
    completed = next(orjson.loads(r.body) for r in receiver.requests if done.id in r.body.decode())
    assert completed["data"]["operation"]["result"] == {"echo": {}}
    assert len(await rig.deliveries(webhook.id)) == 3  # none about the delivery jobs themselves


async def test_finished_deliveries_older_than_the_retention_are_purged(
    storage: Storage, receiver: Receiver
) -> None:
    rig = make_rig(storage, retention=0.2)
    receiver.respond = answers((200, b""))
    try:
        webhook, _ = await rig.webhooks.create(url=receiver.url)
        await rig.emit("api_key.created", {"n": "old"})
        await rig.drain()
        await asyncio.sleep(0.3)
        await rig.emit("api_key.created", {"n": "unsent"})
        assert await rig.webhooks.purge_deliveries() == 1
        await asyncio.sleep(0.3)
        assert await rig.webhooks.purge_deliveries() == 0  # still pending: kept
    finally:
        await rig.client.aclose()
    (left,) = await rig.deliveries(webhook.id)
    assert left.payload["data"] == {"n": "unsent"} and left.status == DeliveryStatus.PENDING


async def test_a_ping_reaches_a_paused_subscription_but_events_do_not(
    rig: Rig, receiver: Receiver
) -> None:
    webhook, secret = await rig.webhooks.create(url=receiver.url, events=["budget.exceeded"])
    await rig.webhooks.update(webhook.id, enabled=False)
    await rig.emit("budget.exceeded", {"budget_id": "b"})
    ping = await rig.webhooks.ping(webhook.id)
    await rig.drain()
    (request,) = receiver.requests
    assert orjson.loads(request.body)["type"] == "webhook.ping"
    verify(secret, request.headers, request.body)
    assert [d.id for d in await rig.deliveries(webhook.id)] == [ping.id]

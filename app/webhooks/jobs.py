"""The webhooks' job handler: one signed delivery attempt per `webhook_delivery` job."""

from __future__ import annotations

from app.operations.runner import Handler, JobContext
from app.queue.names import OperationKind
from app.webhooks.service import WebhookService


def webhook_handlers(webhooks: WebhookService) -> dict[OperationKind, Handler]:
    """What a worker runs for webhook-delivery jobs."""

    async def webhook_delivery(ctx: JobContext) -> object:
        return await webhooks.deliver(
            str(ctx.operation.input["delivery_id"]),
            operation_id=ctx.operation.id,
            attempt=ctx.attempt,
            max_attempts=ctx.operation.max_attempts,
        )

    return {OperationKind.WEBHOOK_DELIVERY: webhook_delivery}

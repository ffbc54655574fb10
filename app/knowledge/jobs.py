"""The knowledge job handler: one document's ingestion, run by the service with the job's
checkpoints and progress."""

from __future__ import annotations

from app.knowledge.service import KnowledgeService
from app.operations.runner import Handler, JobContext
from app.queue.names import OperationKind


def knowledge_handlers(knowledge: KnowledgeService) -> dict[OperationKind, Handler]:
    """What a worker runs for ingestion jobs."""

    async def ingest(ctx: JobContext) -> object:
        return await knowledge.ingest(ctx)

    return {OperationKind.KNOWLEDGE_INGESTION: ingest}

"""The gateway's job handlers: chat completions and embeddings run as jobs (async calls and
batch lines), each through the one gateway call with the job's context (whose usage commits
with the job's outcome)."""

from __future__ import annotations

from app.gateway.calls import GatewayCalls
from app.gateway.schemas import ChatCompletionRequest, EmbeddingRequest
from app.operations.runner import Handler, JobContext
from app.queue.names import OperationKind


def gateway_handlers(calls: GatewayCalls) -> dict[OperationKind, Handler]:
    """What a worker runs for chat-completion and embedding jobs."""

    async def chat_completion(ctx: JobContext) -> object:
        request = ChatCompletionRequest.model_validate(ctx.operation.input)
        # The key's permissions, limits and budgets as they are when the job runs.
        caller = await calls.job_caller(ctx.operation)
        await ctx.checkpoint()  # before the upstream call: a cancelled job makes none
        completion = await calls.complete(caller, request, calls.job_context(ctx))
        await completion.settle()
        return completion.body

    async def embedding(ctx: JobContext) -> object:
        request = EmbeddingRequest.model_validate(ctx.operation.input)
        caller = await calls.job_caller(ctx.operation)
        await ctx.checkpoint()
        embedded = await calls.embed(caller, request, calls.job_context(ctx))
        return embedded.body

    return {
        OperationKind.CHAT_COMPLETION: chat_completion,
        OperationKind.EMBEDDING: embedding,
    }

"""The one path of a gateway call: every LLM call, whatever starts it, goes through here.

A route answering a client, the fast path, an async job, a batch line, a workflow step, and the
experiments and evaluations to come all call `GatewayCalls`, which does, in this order:

1. **permission**: the caller may use the model (or chain) and every stored prompt referenced;
2. **check**: the request as the provider will get it (a malformed one is a 400 before anything
   is counted against a limit);
3. **resolution**: the model or chain to a route of upstream models;
4. **admission**: rate limits and budgets, reserved against the route's first model
   (`Metering.admit`; a refusal is a 429 or a 402, the same from every context);
5. **cache, upstream**: the response cache when the request allows it, else the route;
6. **settlement**: the usage record, cost and execution log (`Metering.settle`: committed before
   a direct call's answer is sent, or with the outcome of the job the call runs in), or the
   reservation given back when no upstream call was made (`Metering.fail`).

The result is typed (`Completion`, `Streamed`, `Embedded`); turning it into an HTTP response or a
job result is the caller's business. A `CallContext` says what started the call, which the usage
record and execution log keep.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Any, Protocol

from app.access.service import ApiKeyService
from app.core import tracing
from app.core.errors import BudgetExceeded, DomainError, InvalidInput, RateLimited
from app.core.metrics import (
    CACHE_LOOKUPS,
    REFUSALS,
    UPSTREAM_DURATION,
    UPSTREAM_FIRST_TOKEN,
    UPSTREAM_REQUESTS,
    Family,
)
from app.gateway.cache import CacheControl, CacheLookup, ResponseCache, completion_chunks, tenant_of
from app.gateway.chat import ChatAnswer, ChatService, ChatStream
from app.gateway.providers.base import JSON
from app.gateway.routing import Route
from app.gateway.schemas import ChatCompletionRequest, EmbeddingRequest
from app.gateway.variants import CallReport, Enrolment, VariantChooser, reported_stream
from app.models.entities import ModelKind
from app.operations.entities import Operation
from app.operations.runner import JobContext
from app.operations.service import OperationService
from app.operations.submit import Owner
from app.queue.names import OperationKind
from app.usage.admission import Admission
from app.usage.entities import UsageType
from app.usage.ledger import UsageLedger
from app.usage.metering import Metering
from app.usage.pricing import estimate_message_tokens
from app.usage.settlement import UsageOutcome

log = logging.getLogger(__name__)

# What every answer says about itself (`answer_headers`), whichever context made the call.
MODEL_HEADER = "x-gateway-model"  # the model that answered, after any fallback
PROVIDER_HEADER = "x-gateway-provider"  # that model's provider
OVERHEAD_HEADER = "x-gateway-overhead-ms"  # the gateway's own time, the upstream's excluded
COST_HEADER = "x-gateway-response-cost"  # USD, as the usage record has it; not on streams


def usd(micros: int) -> str:
    """Micro-dollars as a decimal string of dollars, exactly: 80 gives "0.000080"."""
    sign = "-" if micros < 0 else ""
    whole, fraction = divmod(abs(micros), 1_000_000)
    return f"{sign}{whole}.{fraction:06d}"


def overhead_ms(started: float, upstream: float) -> float:
    """The gateway's own milliseconds since `started` (`time.perf_counter()`), less the
    `upstream` seconds: what the answer's header and the usage record both say."""
    return round(max(time.perf_counter() - started - upstream, 0.0) * 1000, 2)


def answer_headers(
    base: dict[str, str],
    model_id: str,
    provider: str,
    overhead: float,
    cost_micros: int | None = None,
) -> dict[str, str]:
    """`base` (rate limits, cache) with the model, provider, overhead (milliseconds, from
    `overhead_ms`) and, when known as the answer goes out, the cost."""
    headers = {
        **base,
        MODEL_HEADER: model_id,
        PROVIDER_HEADER: provider,
        OVERHEAD_HEADER: f"{overhead:.2f}",
    }
    if cost_micros is not None:
        headers[COST_HEADER] = usd(cost_micros)
    return headers


@dataclass(frozen=True, slots=True)
class Spent:
    """What calls used as their answers state it: tokens from the body's `usage`, cost from the
    cost header (USD, to the micro-dollar). Adds up over several calls."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_micros: int = 0

    @classmethod
    def of(cls, body: Mapping[str, Any], headers: Mapping[str, str]) -> Spent:
        usage = body.get("usage") or {}
        try:
            cost = int(Decimal(headers.get(COST_HEADER, "0")) * 1_000_000)
        except InvalidOperation:
            cost = 0
        return cls(
            int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0), cost
        )

    def __add__(self, other: Spent) -> Spent:
        return Spent(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.cost_micros + other.cost_micros,
        )


class CallSource(StrEnum):
    """What started a gateway call."""

    DIRECT = "direct"  # a client's request, answered (or streamed) in the response
    ASYNC_JOB = "async_job"  # a job submitted with `?async=true`
    BATCH_LINE = "batch_line"  # one line of a batch file, a child job of the batch
    WORKFLOW_STEP = "workflow_step"
    EXPERIMENT = "experiment"
    EVALUATION = "evaluation"
    KNOWLEDGE_INGESTION = "knowledge_ingestion"  # a document's chunks, embedded by its job


@dataclass(frozen=True, slots=True)
class CallContext:
    """What started the call, the job it runs in, the cache policy it asked for, where its
    usage goes (None: committed by this process before the answer leaves), and the experiment
    unit its client named (`X-Experiment-Unit`)."""

    source: CallSource = CallSource.DIRECT
    operation_id: str | None = None
    cache_control: CacheControl | None = None
    ledger: UsageLedger | None = None
    unit: str | None = None

    @property
    def is_async(self) -> bool:
        return self.source is not CallSource.DIRECT

    @classmethod
    def of_job(cls, operation: Operation, ledger: UsageLedger | None = None) -> CallContext:
        """The context of a call a job makes: a batch line when the job is a batch's child;
        its usage goes to `ledger` (the job's, `GatewayCalls.job_context`)."""
        source = CallSource.BATCH_LINE if operation.parent_id else CallSource.ASYNC_JOB
        control = CacheControl.parse(operation.meta.get("cache_control"))
        unit = operation.meta.get("experiment_unit")
        return cls(
            source=source,
            operation_id=operation.id,
            cache_control=control,
            ledger=ledger,
            unit=unit,
        )


DIRECT = CallContext()


class Caller(Protocol):
    """Who a call is made for: an authenticated key (`Principal`), or a job's owner."""

    @property
    def key_id(self) -> str | None: ...

    @property
    def team_id(self) -> str | None: ...

    def ensure_can_call(self, model: str, messages: Iterable[Any] = ()) -> None: ...


@dataclass(frozen=True, slots=True)
class Keyless:
    """A job's owner without an API key (submitted by the gateway itself): no key permissions
    apply, its team's limits and budgets still do."""

    team_id: str | None = None
    key_id: None = None

    def ensure_can_call(self, model: str, messages: Iterable[Any] = ()) -> None:
        return None


@dataclass(slots=True)
class Settlement:
    """A call's usage, cost and log, still to be recorded: before the answer is sent, so that
    no answer leaves unpaid for; raises `Unavailable` when the usage could not be written."""

    metering: Metering
    admission: Admission
    outcome: UsageOutcome
    # The experiment the call is enrolled in hears how it went, once it is settled.
    enrolment: Enrolment | None = None

    async def __call__(self) -> None:
        await self.metering.settle(self.admission, self.outcome)
        if self.enrolment is not None:
            outcome = self.outcome
            await self.enrolment.report(
                CallReport(
                    outcome.model_id,
                    outcome.latency_ms or 0,
                    input_tokens=outcome.input_tokens,
                    output_tokens=outcome.output_tokens,
                    cost_micros=outcome.cost_micros or 0,
                )
            )


@dataclass(slots=True)
class Completion:
    """A chat completion: the OpenAI body, the model that answered, the headers to answer with
    (rate limits, cache), and its settlement, to run once the answer is delivered."""

    body: JSON
    model_id: str
    headers: dict[str, str]
    settle: Settlement


@dataclass(slots=True)
class Streamed:
    """A started stream: the model that answers, its chunks (settled when they end), headers."""

    model_id: str
    chunks: AsyncIterator[JSON]
    headers: dict[str, str]


@dataclass(slots=True)
class Embedded:
    """An embeddings `list` object, the model that answered, and the headers (already settled)."""

    body: JSON
    model_id: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Accepted:
    """A call accepted as a job: the job, and whether this request created it (idempotency)."""

    operation: Operation
    created: bool


@dataclass(slots=True)
class _ChatCall:
    """An admitted chat call, about to be answered from the cache or the route."""

    route: Route
    body: JSON
    admission: Admission
    lookup: CacheLookup | None
    outcome: dict[str, Any]
    enrolment: Enrolment | None = None

    def headers(self) -> dict[str, str]:
        """Rate limits, and what the cache did."""
        if self.lookup is None:
            return self.admission.headers
        return {**self.lookup.headers(), **self.admission.headers}


class GatewayCalls:
    """Permissions, admission, cache, upstream call and settlement of every LLM call."""

    def __init__(
        self,
        chat: ChatService,
        metering: Metering,
        keys: ApiKeyService,
        operations: OperationService,
        *,
        cache: ResponseCache | None = None,
        variants: VariantChooser | None = None,
    ) -> None:
        self._chat = chat
        self._metering = metering
        self._keys = keys
        self._operations = operations
        self.cache = cache
        self._variants = variants

    # --- callers ----------------------------------------------------------------------------

    def job_context(self, job: JobContext) -> CallContext:
        """The context of a call the running `job` makes: its usage commits with the job's
        outcome, so a job is paid for once however often a crash makes it run."""
        return CallContext.of_job(job.operation, self._metering.job_usage(job))

    async def job_caller(self, operation: Operation) -> Caller:
        """The owner of a job as it is when the job runs: a key revoked, suspended or expired
        since is refused (`PermissionDenied`), and its permissions are the current ones."""
        if operation.owner_key_id is None:
            return Keyless(operation.owner_team_id)
        return await self._keys.job_principal(operation.owner_key_id)

    # --- chat -------------------------------------------------------------------------------

    async def complete(
        self, caller: Caller, request: ChatCompletionRequest, context: CallContext = DIRECT
    ) -> Completion:
        """A chat completion for `caller`; `request.stream` is ignored (see `stream`)."""
        started = time.perf_counter()
        call = await self._begin(caller, request, context)
        lookup = call.lookup
        upstream = 0.0
        try:
            if lookup is not None and lookup.response is not None:
                model_id = str(lookup.response.get("model", call.route.name))
                answer = ChatAnswer(model_id, lookup.response, call.route.provider_of(model_id))
            else:
                asked = time.perf_counter()
                with tracing.span("gateway.upstream", kind="client") as span:
                    try:
                        answer = await self._chat.call(call.route, call.body)
                    except BaseException as exc:
                        _upstream_failed(call.route, exc, span)
                        raise
                    upstream = time.perf_counter() - asked
                    _upstream_answered(call.route, answer.model_id, asked, UPSTREAM_DURATION, span)
                if lookup is not None and self.cache is not None:
                    await self.cache.store(lookup, answer.body)
        except BaseException as exc:
            await self._metering.fail(call.admission, exc, **call.outcome)
            await _report_failure(call.enrolment, exc, started)
            raise
        usage = answer.usage
        settled = UsageOutcome(
            input_tokens=int(usage.get("prompt_tokens") or 0),
            output_tokens=int(usage.get("completion_tokens") or 0),
            model_id=answer.model_id,
            provider=answer.provider,
            cache_hit=lookup is not None and lookup.hit,
            response_body=answer.body,
            latency_ms=int((time.monotonic() - call.admission.started) * 1000),
            **call.outcome,
        )
        cost = await self._metering.priced(call.admission, settled)
        settled.overhead_ms = overhead_ms(started, upstream)
        headers = answer_headers(
            call.headers(), answer.model_id, answer.provider, settled.overhead_ms, cost
        )
        return Completion(
            answer.body,
            answer.model_id,
            headers,
            Settlement(self._metering, call.admission, settled, call.enrolment),
        )

    async def stream(
        self, caller: Caller, request: ChatCompletionRequest, context: CallContext = DIRECT
    ) -> Streamed:
        """A streamed chat completion whose first chunk has arrived (so the route could still
        fall back); it is settled when its chunks end, however they end."""
        started = time.perf_counter()
        call = await self._begin(caller, request, context)
        lookup = call.lookup
        include_usage = request.wants_usage_chunk()
        upstream = 0.0
        # The answer of a stream is never held whole: its log keeps the request only.
        try:
            if lookup is not None and lookup.response is not None:
                stream = _replayed(call.route, lookup.response, include_usage)
            else:
                asked = time.perf_counter()
                # Up to the first chunk: the rest is relayed under the request's own span.
                with tracing.span("gateway.upstream", kind="client") as span:
                    try:
                        stream = await self._chat.open_stream(call.route, call.body, include_usage)
                    except BaseException as exc:
                        _upstream_failed(call.route, exc, span)
                        raise
                    upstream = time.perf_counter() - asked
                    # `open_stream` returns once the first chunk is in: that is the time to it.
                    _upstream_answered(
                        call.route, stream.model_id, asked, UPSTREAM_FIRST_TOKEN, span
                    )
        except BaseException as exc:
            await self._metering.fail(call.admission, exc, **call.outcome)
            await _report_failure(call.enrolment, exc, started)
            raise
        first_token = time.perf_counter()
        # Up to the first chunk; the cost is known only once the stream ends (its usage record).
        overhead = overhead_ms(started, upstream)
        chunks = self._metering.stream(
            call.admission,
            stream.chunks,
            lambda: stream.usage,
            model_id=stream.model_id,
            provider=stream.provider,
            cache_hit=lookup is not None and lookup.hit,
            overhead_ms=overhead,
            **call.outcome,
        )
        if call.enrolment is not None:
            hit = lookup is not None and lookup.hit
            chunks = reported_stream(
                chunks,
                call.enrolment,
                (started, first_token),
                stream.model_id,
                lambda: stream.usage,
                lambda i, o: self._metering.priced(
                    call.admission,
                    UsageOutcome(
                        input_tokens=i, output_tokens=o, model_id=stream.model_id, cache_hit=hit
                    ),
                ),
            )
        headers = answer_headers(call.headers(), stream.model_id, stream.provider, overhead)
        return Streamed(stream.model_id, chunks, headers)

    async def submit(
        self,
        caller: Caller,
        request: ChatCompletionRequest,
        *,
        cache_control: str | None = None,
        idempotency_key: str | None = None,
        unit: str | None = None,
    ) -> Accepted:
        """Accept a chat completion as a job, once it is committed; it is admitted when it runs
        (`complete` with the job's context), as the same call made directly would be."""
        caller.ensure_can_call(request.model, request.messages)
        CacheControl.parse(cache_control)  # a bad max-age is a 400, even for a job
        if request.stream:
            raise InvalidInput("an async request cannot be streamed", param="stream")
        wire = request.check()
        await self._chat.resolve(request.model)  # an unknown model is refused now, not later
        # The worker applies the same cache policy and experiment unit as a direct call would.
        meta = {"cache_control": cache_control} if cache_control else {}
        if unit is not None:
            meta["experiment_unit"] = unit
        operation, created = await self._operations.submit(
            kind=OperationKind.CHAT_COMPLETION,
            input=wire,
            owner=Owner(key_id=caller.key_id, team_id=caller.team_id),
            idempotency_key=idempotency_key,
            meta=meta or None,
        )
        return Accepted(operation, created)

    # --- embeddings -------------------------------------------------------------------------

    async def embed(
        self, caller: Caller, request: EmbeddingRequest, context: CallContext = DIRECT
    ) -> Embedded:
        """Embedding vectors for `caller`, admitted and settled like a chat completion."""
        started = time.perf_counter()
        caller.ensure_can_call(request.model)
        request.check()
        route = await self._chat.resolve(request.model, kind=ModelKind.EMBEDDING)
        outcome = {**_outcome(context), "usage_type": UsageType.EMBEDDING}
        # Only admission raises these (an upstream's 429 is `UpstreamRateLimited`).
        with _counting_refusals():
            async with self._metering.metered(
                caller,
                route.steps[0].upstream.model_id,
                estimate_message_tokens(request.inputs()),
                0,
                **outcome,
            ) as call:
                asked = time.perf_counter()
                with tracing.span("gateway.upstream", kind="client") as span:
                    try:
                        answer = await self._chat.embed(request)
                    except BaseException as exc:
                        _upstream_failed(route, exc, span)
                        raise
                    upstream = time.perf_counter() - asked
                    _upstream_answered(route, answer.model_id, asked, UPSTREAM_DURATION, span)
                call.done_with_usage(
                    answer.body.get("usage"), model_id=answer.model_id, provider=answer.provider
                )
                assert call.outcome is not None
                cost = await self._metering.priced(call.admission, call.outcome)
                # Before the settlement the block's end makes, as a chat call's comes after.
                overhead = call.outcome.overhead_ms = overhead_ms(started, upstream)
        headers = answer_headers(call.headers, answer.model_id, answer.provider, overhead, cost)
        return Embedded(answer.body, answer.model_id, headers)

    # --- shared steps -----------------------------------------------------------------------

    async def _begin(
        self, caller: Caller, request: ChatCompletionRequest, context: CallContext
    ) -> _ChatCall:
        """Steps 1 to 5 of a chat call: permission, check, resolution, admission, then the
        prepared body and the cache's answer (a failure after admission gives it back)."""
        caller.ensure_can_call(request.model, request.messages)
        # The caller may make the call it asked for; an experiment may make it as a variant.
        enrolment = None
        if self._variants is not None and context.source in _ENROLLED:
            enrolment = await self._variants.choose(caller, request, context)
            if enrolment is not None:
                request = enrolment.request
        # Before admission: a malformed request is a 400, never a 402 or 429 on its max_tokens.
        wire = request.check()
        route = await self._chat.resolve(request.model)
        # Admitted against the route's first model; a fallback's price is reconciled at settle.
        with _counting_refusals():
            admission = await self._metering.admit(
                caller,
                route.steps[0].upstream.model_id,
                estimate_message_tokens(m.text() for m in request.messages),
                request.max_completion_tokens or request.max_tokens,
            )
        outcome = _chat_outcome(context, request)
        try:
            body = await self._chat.prepare(request, wire)
            lookup = None
            if self.cache is not None:
                with tracing.span("gateway.cache") as span:
                    lookup = await self._cache_lookup(self.cache, caller, route, body, context)
                    kind = "exact" if lookup.similarity is None else "semantic"
                    CACHE_LOOKUPS(kind, lookup.status).inc()
                    span.set_attribute("gateway.cache.result", lookup.status)
        except BaseException as exc:
            await self._metering.fail(admission, exc, **outcome)
            await _report_failure(enrolment, exc, time.perf_counter())
            raise
        return _ChatCall(route, body, admission, lookup, outcome, enrolment)

    @staticmethod
    async def _cache_lookup(
        cache: ResponseCache, caller: Caller, route: Route, body: JSON, context: CallContext
    ) -> CacheLookup:
        # Every model the route may call, at its configuration: a change to any is a new key.
        version = ",".join(
            f"{s.upstream.model_id}:{s.upstream.config_version}" for s in route.steps
        )
        return await cache.lookup(
            body,
            model=route.name,
            config_version=version,
            tenant=tenant_of(caller.team_id, caller.key_id),
            control=context.cache_control,
        )


# Client calls are enrolled in experiments; an experiment's own batch calls are not.
_ENROLLED = frozenset({CallSource.DIRECT, CallSource.ASYNC_JOB})


async def _report_failure(enrolment: Enrolment | None, exc: BaseException, started: float) -> None:
    """An enrolled call that failed with a domain error counts against its variant; one cut
    short otherwise (a client gone, a bug) says nothing about the variant."""
    if enrolment is not None and isinstance(exc, DomainError):
        await enrolment.report(CallReport.failed(exc, started))


# ---- metrics (app/core/metrics.py): every upstream call and refusal is counted here ----------


@contextmanager
def _counting_refusals() -> Iterator[None]:
    """Count the 429s and 402s of admission by reason."""
    try:
        yield
    except RateLimited:
        REFUSALS("rate_limit").inc()
        raise
    except BudgetExceeded:
        REFUSALS("budget").inc()
        raise


def _provider(route: Route, model_id: str) -> str:
    """The provider of the route's model `model_id` (the one that answered)."""
    for step in route.steps:
        if step.upstream.model_id == model_id:
            return step.upstream.provider.value
    return route.steps[0].upstream.provider.value


def _upstream_answered(
    route: Route,
    model_id: str,
    started: float,
    latency: Family[Any],
    span: tracing.SpanHandle = tracing.NO_SPAN,
) -> None:
    provider = _provider(route, model_id)
    UPSTREAM_REQUESTS(provider, model_id, "ok").inc()
    latency(provider, model_id).observe(time.perf_counter() - started)
    if span is not tracing.NO_SPAN:
        span.set_attributes(_upstream_attributes(route, provider, model_id, "ok"))


def _upstream_failed(
    route: Route, exc: BaseException, span: tracing.SpanHandle = tracing.NO_SPAN
) -> None:
    """A call no model of the route answered, counted against the route's first model with its
    error code (a bounded set: the `DomainError` codes)."""
    if isinstance(exc, DomainError):
        outcome = exc.code
    elif isinstance(exc, Exception):
        outcome = "internal_error"
    else:
        outcome = "cancelled"
    first = route.steps[0].upstream
    UPSTREAM_REQUESTS(first.provider.value, first.model_id, outcome).inc()
    if span is not tracing.NO_SPAN:
        span.set_attributes(
            _upstream_attributes(route, first.provider.value, first.model_id, outcome)
        )


def _upstream_attributes(
    route: Route, provider: str, model_id: str, outcome: str
) -> dict[str, str | int]:
    """What an upstream call's span says: the model asked for, the one that answered (or the
    route's first, when none did), its provider, the outcome, and how many models it had."""
    return {
        "gateway.route": route.name,
        "gateway.provider": provider,
        "gateway.model": model_id,
        "gateway.outcome": outcome,
        "gateway.route.steps": len(route.steps),
    }


def _outcome(context: CallContext) -> dict[str, Any]:
    """What the usage record and execution log keep of the call's context, and where they go."""
    if context.source is CallSource.DIRECT:
        return {} if context.ledger is None else {"ledger": context.ledger}
    return {"operation_id": context.operation_id, "is_async": True, "ledger": context.ledger}


def _chat_outcome(context: CallContext, request: ChatCompletionRequest) -> dict[str, Any]:
    """What every chat call's usage record and execution log keep, however it ends: its
    context, and the request (logged when the configuration allows bodies)."""
    return {**_outcome(context), "request_body": request}


def _replayed(route: Route, cached: JSON, include_usage: bool) -> ChatStream:
    """A cached completion replayed as the chunks a stream would have sent."""

    async def replay() -> AsyncIterator[JSON]:
        for chunk in completion_chunks(cached, include_usage=include_usage):
            yield chunk

    model_id = str(cached.get("model", route.name))
    return ChatStream(model_id, replay(), cached.get("usage"), route.provider_of(model_id))

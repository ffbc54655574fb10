"""Traces over OpenTelemetry, exported over OTLP/HTTP when OTEL_EXPORTER_OTLP_ENDPOINT is set.

Spans: the HTTP request (`RequestTracing` on the FastAPI stack, `server_span` on the fast
path), admission, the upstream call, a job's enqueue and its run on a worker, and a webhook
delivery. Off, which is the default, nothing imports OpenTelemetry's SDK and every span asked
for is `NO_SPAN`, one shared object whose methods do nothing: a call site costs a global read.

Attributes are bounded facts (route templates, providers, model ids, job kinds and ids,
outcomes, token counts), never a prompt, an answer, a key, a header value or a URL a user
configured. An exception ends a span as an error named by its code, not by its message (which
may quote the request).

A job's trace context is written on its row (`Operation.trace_context`, W3C `traceparent`) by
the span that created it, so its run on a worker, however much later, is that span's child, on
every attempt and after any re-send.

Each process has its own provider (not OpenTelemetry's global one), built once by `configure`
or, in tests, handed over with `install`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Literal

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.errors import DomainError

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer
    from opentelemetry.util.types import AttributeValue

log = logging.getLogger(__name__)

Kind = Literal["internal", "server", "client", "producer", "consumer"]
Attributes = Mapping[str, "AttributeValue"]

# The route of a stack request no route matched (as its metrics label says).
UNMATCHED_ROUTE = "unmatched"
_TRACE_HEADERS = (b"traceparent", b"tracestate")

_tracer: Tracer | None = None
_provider: TracerProvider | None = None


def enabled() -> bool:
    """Whether this process records spans."""
    return _tracer is not None


class _NoSpan:
    """What every span is while tracing is off: entered, given attributes, ended, for nothing."""

    __slots__ = ()

    def __enter__(self) -> _NoSpan:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        return None

    def set_attributes(self, attributes: Attributes) -> None:
        return None

    def set_http_status(self, status: int) -> None:
        return None

    def set_error(self, kind: str) -> None:
        return None

    def rename(self, name: str) -> None:
        return None


NO_SPAN = _NoSpan()


class _Active:
    """A started span, current inside its `with` block; an exception ends it as an error."""

    __slots__ = ("_span", "_token")

    def __init__(self, span: Span) -> None:
        self._span = span
        self._token: object = None

    def __enter__(self) -> _Active:
        from opentelemetry import context, trace

        self._token = context.attach(trace.set_span_in_context(self._span))
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        from opentelemetry import context

        if exc is not None:
            self.set_error(error_type(exc))
        context.detach(self._token)  # type: ignore[arg-type]
        self._span.end()

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        self._span.set_attribute(key, value)

    def set_attributes(self, attributes: Attributes) -> None:
        self._span.set_attributes(attributes)

    def set_http_status(self, status: int) -> None:
        """The response's status code; a 5xx makes the span an error (a 4xx is the client's)."""
        self._span.set_attribute("http.response.status_code", status)
        if status >= 500:
            self.set_error(str(status))

    def set_error(self, kind: str) -> None:
        """End as an error of `kind` (a bounded name: a code, a type, a status)."""
        from opentelemetry.trace import Status, StatusCode

        self._span.set_attribute("error.type", kind)
        self._span.set_status(Status(StatusCode.ERROR, kind))

    def rename(self, name: str) -> None:
        self._span.update_name(name)


SpanHandle = _NoSpan | _Active


def error_type(exc: BaseException) -> str:
    """A bounded name for what went wrong: a `DomainError`'s code, else the exception's type."""
    if isinstance(exc, DomainError):
        return exc.code
    return type(exc).__name__


def _start(name: str, kind: Kind, attributes: Attributes | None, parent: Context | None) -> _Active:
    from opentelemetry.trace import SpanKind

    assert _tracer is not None
    span = _tracer.start_span(
        name,
        context=parent,
        kind=SpanKind[kind.upper()],
        attributes=attributes,
        record_exception=False,  # its message and traceback may quote the request
        set_status_on_exception=False,
    )
    return _Active(span)


def span(name: str, attributes: Attributes | None = None, *, kind: Kind = "internal") -> SpanHandle:
    """A child span of the current one (or a new trace's first)."""
    if _tracer is None:
        return NO_SPAN
    return _start(name, kind, attributes, None)


def server_span(
    method: str, route: str | None, headers: Iterable[tuple[bytes, bytes]]
) -> SpanHandle:
    """The span of a request (`route`: its template, when known yet), continuing the caller's
    trace when it sent a `traceparent`."""
    if _tracer is None:
        return NO_SPAN
    carrier = {
        key.decode("latin-1"): value.decode("latin-1")
        for key, value in headers
        if key in _TRACE_HEADERS
    }
    attributes = {"http.request.method": method}
    if route is not None:
        attributes["http.route"] = route
    name = f"{method} {route}" if route is not None else method
    return _start(name, "server", attributes, _extract(carrier) if carrier else None)


def job_span(
    name: str, carrier: Mapping[str, str], attributes: Attributes | None = None
) -> SpanHandle:
    """The span of a job's run: a child of the span whose context `carrier` holds (`carrier()`
    when the job was created), or a new trace's first when it holds none."""
    if _tracer is None:
        return NO_SPAN
    return _start(name, "consumer", attributes, _extract(carrier) if carrier else None)


def carrier() -> dict[str, str]:
    """The current span's context as W3C headers (`traceparent`), to store with a job; empty
    when tracing is off or no span is current."""
    if _tracer is None:
        return {}
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    headers: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(headers)
    return headers


def _extract(headers: Mapping[str, str]) -> Context:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract(headers)


class RequestTracing:
    """ASGI middleware of the FastAPI stack: a server span per request, named by its route's
    template once routed (the fast path opens its own, `app.fastpath`). Added only while
    tracing is on."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _tracer is None:
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        status = 500

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        with server_span(method, None, scope["headers"]) as current:
            try:
                await self.app(scope, receive, send_noting_status)
            finally:
                route = getattr(scope.get("route"), "path", None)
                route = route if isinstance(route, str) else UNMATCHED_ROUTE
                current.rename(f"{method} {route}")
                current.set_attribute("http.route", route)
                current.set_http_status(status)


# ---- set-up ----------------------------------------------------------------------------------


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL under OTEL_EXPORTER_OTLP_ENDPOINT (a base URL, by the spec)."""
    base = endpoint.rstrip("/")
    return base if base.endswith("/v1/traces") else f"{base}/v1/traces"


def configure(endpoint: str | None, service_name: str) -> bool:
    """Export this process's spans to `endpoint` over OTLP/HTTP, in batches from a thread.

    Nothing when `endpoint` is unset or spans are already recorded here; True when it turned
    tracing on. The exporter reads OpenTelemetry's other variables itself
    (OTEL_EXPORTER_OTLP_HEADERS, _TIMEOUT, _COMPRESSION, _CERTIFICATE), the provider
    OTEL_TRACES_SAMPLER and OTEL_RESOURCE_ATTRIBUTES.
    """
    if not endpoint or _tracer is not None:
        return False
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise RuntimeError(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set, but OpenTelemetry's SDK is not installed: "
            "install the gateway with its `otel` extra (pip install 'llm-gateway[otel]'), or "
            "unset OTEL_EXPORTER_OTLP_ENDPOINT."
        ) from exc
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=traces_url(endpoint))))
    install(provider)
    log.info("traces of %s exported to %s", service_name, traces_url(endpoint))
    return True


def install(provider: TracerProvider | None) -> None:
    """Record spans with `provider` from now on (None: stop recording)."""
    global _tracer, _provider
    if provider is None:
        _tracer = _provider = None
        return
    _provider = provider
    _tracer = provider.get_tracer("llm-gateway")


def flush() -> None:
    """Export the spans still buffered (at the end of an app's or a worker's life)."""
    if _provider is not None:
        _provider.force_flush()

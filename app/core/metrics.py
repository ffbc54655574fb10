"""Every Prometheus metric the gateway records, defined once, in the process's default registry.

Names follow Prometheus conventions (base units, `_total` counters, a `gateway_` prefix) and
labels are kept to bounded sets: route templates, methods, status codes, providers, model ids,
job kinds, queue names, outcomes. Never a key id, a team, a user or anything a client wrote.

Each process has its own registry and exposes it itself: the API on `/metrics` (or on
`METRICS_PORT`), each worker process on a port of its own from `WORKER_METRICS_PORT` on
(`serve_on_free_port`), so several processes on one host never share or clobber a value.
Counters therefore restart at zero with their process, which `rate()` and `increase()` expect.

Recording sits on the hot path, so the call sites look children up through `Family`: one dict
lookup, without the lock `labels()` takes on every call.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Generic, TypeVar
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.metrics import MetricWrapperBase
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

M = TypeVar("M", bound=MetricWrapperBase)

# Seconds. The gateway's own answers take a millisecond or two; upstream calls up to minutes.
_HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_UPSTREAM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
_JOB_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)

# The route label of requests no route matched (a 404 or 405 of the router).
UNMATCHED_ROUTE = "unmatched"


class Family(Generic[M]):
    """A labelled metric whose children are kept here once made, so recording one is a dict
    lookup rather than `labels()` (a lock and a tuple check on every call)."""

    __slots__ = ("_children", "metric")

    def __init__(self, metric: M) -> None:
        self.metric = metric
        self._children: dict[tuple[str, ...], M] = {}

    def __call__(self, *values: str) -> M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.metric.labels(*values)
        return child


# ---- HTTP ------------------------------------------------------------------------------------

HTTP_REQUESTS = Family(
    Counter(
        "gateway_http_requests_total",
        "HTTP requests answered, by route template, method and status code.",
        ["route", "method", "status"],
    )
)
HTTP_DURATION = Family(
    Histogram(
        "gateway_http_request_duration_seconds",
        "Time from a request's arrival to the end of its response (a stream: its last chunk).",
        ["route", "method"],
        buckets=_HTTP_BUCKETS,
    )
)

# ---- LLM calls (app/gateway/calls.py, app/usage/metering.py) -------------------------------

UPSTREAM_REQUESTS = Family(
    Counter(
        "gateway_upstream_requests_total",
        "LLM calls sent upstream, by provider, gateway model and outcome (ok or an error code).",
        ["provider", "model", "outcome"],
    )
)
UPSTREAM_DURATION = Family(
    Histogram(
        "gateway_upstream_request_duration_seconds",
        "Time an upstream answered a whole (non-streamed) call in, fallbacks included.",
        ["provider", "model"],
        buckets=_UPSTREAM_BUCKETS,
    )
)
UPSTREAM_FIRST_TOKEN = Family(
    Histogram(
        "gateway_upstream_time_to_first_token_seconds",
        "Time until a streamed call's first chunk arrived from upstream.",
        ["provider", "model"],
        buckets=_UPSTREAM_BUCKETS,
    )
)
TOKENS = Family(
    Counter(
        "gateway_tokens_total",
        "Tokens of settled calls, by gateway model and direction (input or output).",
        ["model", "direction"],
    )
)
COST = Family(
    Counter(
        "gateway_cost_usd_total",
        "What settled calls cost, in US dollars, by gateway model (cache hits cost nothing).",
        ["model"],
    )
)
CACHE_LOOKUPS = Family(
    Counter(
        "gateway_cache_lookups_total",
        "Response cache lookups, by kind (exact or semantic; a miss counts as exact) and result "
        "(hit, miss, bypass).",
        ["kind", "result"],
    )
)
REFUSALS = Family(
    Counter(
        "gateway_admission_refusals_total",
        "Calls refused at admission, by reason (rate_limit: a 429, budget: a 402).",
        ["reason"],
    )
)

# ---- jobs (app/operations/runner.py) ---------------------------------------------------------

JOB_ATTEMPTS = Family(
    Counter(
        "gateway_job_attempts_total",
        "Job attempts run by a worker, by kind and outcome (completed, failed, retried, "
        "cancelled).",
        ["kind", "outcome"],
    )
)
JOBS_FINISHED = Family(
    Counter(
        "gateway_jobs_finished_total",
        "Jobs that reached a final status on a worker, by kind and status (completed, failed).",
        ["kind", "status"],
    )
)
JOB_DURATION = Family(
    Histogram(
        "gateway_job_run_duration_seconds",
        "Time one attempt of a job ran its handler, by kind.",
        ["kind"],
        buckets=_JOB_BUCKETS,
    )
)
LEASE_RECOVERIES = Family(
    Counter(
        "gateway_job_lease_recoveries_total",
        "Running jobs whose lease expired, found by the sweeper: recovered (sent again) or "
        "exhausted (failed, out of attempts).",
        ["outcome"],
    )
)
QUEUE_DEPTH = Family(
    Gauge(
        "gateway_queue_depth",
        "Pending jobs per queue (delayed retries included, held children not), read from the "
        "operations table.",
        ["queue"],
    )
)
QUEUE_HELD = Family(
    Gauge(
        "gateway_queue_held_jobs",
        "Children held back by their parent's window per queue (sent as earlier ones finish).",
        ["queue"],
    )
)
QUEUE_OLDEST_AGE = Family(
    Gauge(
        "gateway_queue_oldest_job_age_seconds",
        "Age of the oldest pending job per queue (0 when the queue is empty).",
        ["queue"],
    )
)

# ---- webhooks (app/webhooks/service.py) ------------------------------------------------------

WEBHOOK_DELIVERIES = Family(
    Counter(
        "gateway_webhook_deliveries_total",
        "Webhook delivery attempts, by outcome (succeeded, retry, abandoned, skipped).",
        ["outcome"],
    )
)


def metric_names(registry: CollectorRegistry = REGISTRY) -> set[str]:
    """The names of the series the gateway's metrics expose (a histogram's `_bucket`, `_sum`,
    `_count` included), for checks that a dashboard or an alert names only real metrics."""
    names: set[str] = set()
    for family in registry.collect():
        if family.name.startswith("gateway_"):
            names.update(sample.name for sample in family.samples)
            names.add(family.name + ("_total" if family.type == "counter" else ""))
            if family.type == "histogram":
                names.update(f"{family.name}_{part}" for part in ("bucket", "sum", "count"))
    return names


def exposition(registry: CollectorRegistry = REGISTRY) -> tuple[bytes, str]:
    """The registry in Prometheus's text format, and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST


class MetricsListener:
    """A process's metrics served on a port of its own, on a thread; `close` frees the port."""

    def __init__(self, server: WSGIServer, port: int) -> None:
        self._server = server
        self.port = port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def serve_on_free_port(host: str, base: int, span: int) -> MetricsListener | None:
    """Expose this process's metrics on the first free port of `base .. base + span - 1`.

    Binding is atomic, so processes started together each get a port of their own; Prometheus
    scrapes the whole range. None (logged) when every port is taken.
    """
    for port in range(base, min(base + span, 65536)):
        try:
            server, _thread = start_http_server(port, addr=host)
        except OSError:
            continue
        log.info("metrics of process %d served on %s:%d/metrics", os.getpid(), host, port)
        return MetricsListener(server, port)
    log.warning("no free metrics port in %d..%d: this process exposes none", base, base + span - 1)
    return None


# ---- call recording --------------------------------------------------------------------------


def observe_settled(model: str, input_tokens: int, output_tokens: int, cost_micros: int) -> None:
    """Count a settled call's tokens and cost (`Metering.settle`: every call, every process)."""
    if input_tokens:
        TOKENS(model, "input").inc(input_tokens)
    if output_tokens:
        TOKENS(model, "output").inc(output_tokens)
    if cost_micros:
        COST(model).inc(cost_micros / 1_000_000)


# ---- HTTP recording ------------------------------------------------------------------------


def observe_request(route: str, method: str, status: int, started: float) -> None:
    """Count one answered request and its duration since `started` (`time.perf_counter()`)."""
    HTTP_REQUESTS(route, method, str(status)).inc()
    HTTP_DURATION(route, method).observe(time.perf_counter() - started)


class RequestMetrics:
    """ASGI middleware of the FastAPI stack: every request counted by its route's template.

    The fast path (`app/fastpath.py`) answers its requests in front of this stack and records
    them itself, with the same templates.
    """

    def __init__(self, app: ASGIApp, route_of: Callable[[Scope], str] | None = None) -> None:
        self.app = app
        self.route_of = route_of or _route_template

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            observe_request(self.route_of(scope), scope["method"], status, started)


def _route_template(scope: Scope) -> str:
    """The path template of the route that answered (set by the router), never the raw path."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED_ROUTE

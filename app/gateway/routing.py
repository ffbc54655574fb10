"""Routes: the steps a request may take, tried in order with retries and circuit breakers."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from app.core.errors import (
    CircuitOpen,
    DomainError,
    Transient,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from app.gateway.providers.base import Upstream

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Step:
    """One model of a route, with its retry policy and latency threshold."""

    upstream: Upstream
    max_retries: int = 0
    backoff_ms: int = 200
    latency_threshold_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Route:
    """What a client's `model` resolved to: a single model, or the steps of a chain."""

    name: str
    steps: tuple[Step, ...]
    chain: bool = False

    def provider_of(self, model_id: str) -> str:
        """The provider of the route's model `model_id` (a cached answer names only its model);
        the first step's when no step has it."""
        for step in self.steps:
            if step.upstream.model_id == model_id:
                return step.upstream.provider.value
        return self.steps[0].upstream.provider.value


class CircuitBreakers:
    """One breaker per upstream model, in this process.

    Closed: calls pass. After `threshold` consecutive failures it opens and calls skip the
    upstream; after `cooldown` seconds one trial call passes (half-open): success closes the
    breaker, failure opens it again for another cool-down.
    """

    def __init__(
        self,
        *,
        threshold: int = 5,
        cooldown: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self._clock = clock
        self._failures: dict[str, int] = {}
        self._opened_at: dict[str, float] = {}
        self._trial: set[str] = set()

    def state(self, key: str) -> str:
        opened = self._opened_at.get(key)
        if opened is None:
            return "closed"
        if key in self._trial or self._clock() - opened >= self.cooldown:
            return "half_open"
        return "open"

    def allow(self, key: str) -> bool:
        """Whether a call may go to `key` now (claiming the one half-open trial if it is due)."""
        opened = self._opened_at.get(key)
        if opened is None:
            return True
        if key in self._trial or self._clock() - opened < self.cooldown:
            return False
        self._trial.add(key)
        return True

    def success(self, key: str) -> None:
        self._failures.pop(key, None)
        self._opened_at.pop(key, None)
        self._trial.discard(key)

    def failure(self, key: str) -> None:
        count = self._failures.get(key, 0) + 1
        self._failures[key] = count
        if key in self._trial or count >= self.threshold:
            if key not in self._opened_at or key in self._trial:
                log.warning("circuit opened for upstream model %s after %d failures", key, count)
            self._opened_at[key] = self._clock()
            self._trial.discard(key)

    def release(self, key: str) -> None:
        """Give back a half-open trial that ended without a verdict (cancelled, slow)."""
        self._trial.discard(key)


def _counts_against_upstream(exc: DomainError) -> bool:
    # 429 says the upstream is healthy but busy; 4xx are about the request or our set-up.
    return isinstance(exc, UpstreamUnavailable | UpstreamTimeout)


def _ends_the_route(exc: DomainError) -> bool:
    # A request the upstream found invalid would be invalid for the next model too; other
    # refusals (our credential, a model gone upstream) are about this step only.
    if isinstance(exc, UpstreamRejected):
        return exc.status in (400, 413)
    return not isinstance(exc, Transient)


async def run_route(
    route: Route,
    attempt: Callable[[Upstream], Awaitable[T]],
    breakers: CircuitBreakers,
    *,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> tuple[Step, T]:
    """The first step whose `attempt` succeeds, and its result.

    Transient errors are retried on the same step with exponential backoff, then the route moves
    on; a step slower than its latency threshold is abandoned for the next (except the last);
    a step whose breaker is open is skipped. The last error is raised when every step failed.
    """
    last_error: DomainError | None = None
    for position, step in enumerate(route.steps):
        key = step.upstream.model_id
        threshold = step.latency_threshold_ms
        if position == len(route.steps) - 1:
            threshold = None  # nothing to move on to: waiting is better than failing
        for retry in range(step.max_retries + 1):
            if not breakers.allow(key):
                last_error = last_error or CircuitOpen(
                    f"upstream model '{key}' is failing; calls to it are paused for now",
                    param="model",
                )
                break
            try:
                if threshold is None:
                    result = await attempt(step.upstream)
                else:
                    async with asyncio.timeout(threshold / 1000):
                        result = await attempt(step.upstream)
            except TimeoutError:
                breakers.release(key)
                last_error = UpstreamTimeout(
                    f"model '{key}' was slower than its {threshold} ms threshold", param="model"
                )
                break
            except DomainError as exc:
                if _counts_against_upstream(exc):
                    breakers.failure(key)
                else:
                    breakers.success(key)
                if _ends_the_route(exc):
                    raise
                last_error = exc
                if isinstance(exc, Transient) and retry < step.max_retries:
                    await sleep(step.backoff_ms / 1000 * (2**retry))
                    continue
                break
            except BaseException:
                breakers.release(key)
                raise
            breakers.success(key)
            return step, result
    assert last_error is not None
    raise last_error

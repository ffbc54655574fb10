"""Experiments' hook into the one call path: which variant a call is made as, and its outcome.

`GatewayCalls` asks its `VariantChooser`, when it has one, about every direct or async chat
call the caller may make, before anything is counted; a call enrolled in an experiment is made
as the variant's request (another model or chain, a pinned prompt version, other parameters)
and reported once it is over. The protocol is declared here and satisfied by
`app.experiments` (a package above the gateway), which `build_services` passes in.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from app.core.errors import DomainError
from app.gateway.schemas import ChatCompletionRequest

if TYPE_CHECKING:
    from app.gateway.calls import CallContext, Caller

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class CallReport:
    """How an enrolled call ended: what it cost, how long it took, and its error if it failed."""

    model_id: str | None  # the model that answered (after any fallback)
    latency_ms: int
    first_token_ms: int | None = None  # streams only
    input_tokens: int = 0
    output_tokens: int = 0
    cost_micros: int = 0
    error: str | None = None

    @classmethod
    def failed(cls, exc: DomainError, started: float) -> CallReport:
        return cls(None, _ms_since(started), error=f"{exc.code}: {exc.message}")


class Enrolment(Protocol):
    """A call enrolled in an experiment: the request its variant makes, and where it reports."""

    @property
    def request(self) -> ChatCompletionRequest: ...

    async def report(self, outcome: CallReport) -> None:
        """Record how the call ended (after its settlement; never raises)."""
        ...


class VariantChooser(Protocol):
    """Enrols calls in the experiment running on their model or prompt, if any."""

    async def choose(
        self, caller: Caller, request: ChatCompletionRequest, context: CallContext
    ) -> Enrolment | None:
        """The enrolment of this call, or None (no experiment, or no unit to assign by); cheap
        when no experiment is running."""
        ...


def _ms_since(started: float) -> int:
    return int((time.perf_counter() - started) * 1000)


async def reported_stream(
    chunks: AsyncIterator[T],
    enrolment: Enrolment,
    timing: tuple[float, float],
    model_id: str,
    usage: Callable[[], dict[str, Any] | None],
    price: Callable[[int, int], Awaitable[int]],
) -> AsyncIterator[T]:
    """Relay a stream's chunks, then report it with its `usage()` and the cost `price` gives
    its input and output tokens; `timing` holds when the call began and when its first chunk
    came (`time.perf_counter`). A stream ending in a domain error reports the error."""
    started, first_token = timing
    try:
        async for chunk in chunks:
            yield chunk
    except DomainError as exc:
        await enrolment.report(CallReport.failed(exc, started))
        raise
    used = usage() or {}
    tokens_in = int(used.get("prompt_tokens") or 0)
    tokens_out = int(used.get("completion_tokens") or 0)
    await enrolment.report(
        CallReport(
            model_id,
            _ms_since(started),
            int((first_token - started) * 1000),
            tokens_in,
            tokens_out,
            await price(tokens_in, tokens_out),
        )
    )

"""Work handed over one item at a time and done a round at a time (group commit).

A caller that finds fewer rounds under way than `in_flight` starts one with its own item at
once; callers that arrive while that many run wait, and the next round to start takes all of
them. Under load one round (a statement, a thread hand-off) serves many callers; a lone caller
waits for nobody. Each caller gets its own item's outcome. With more than one round in flight
a caller waits for its own round, not also for the end of one that started without it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")

# Does a round: one outcome per item, in order (None: done; an exception: that item failed).
Round = Callable[[list[T]], Awaitable[Sequence[BaseException | None]]]


@dataclass(slots=True)
class _Waiting(Generic[T]):
    item: T
    done: asyncio.Future[BaseException | None]


class Rounds(Generic[T]):
    """Items submitted concurrently, done together by `run` (see the module docstring)."""

    def __init__(self, run: Round[T], *, in_flight: int = 1) -> None:
        if in_flight < 1:
            raise ValueError("at least one round must be allowed in flight")
        self._run = run
        self._in_flight = in_flight
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting: list[_Waiting[T]] = []
        self._running = 0
        self._runners: set[asyncio.Task[None]] = set()

    async def submit(self, item: T) -> None:
        """Have `item` done; returns once its round is, raises what failed it."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new event loop (tests, a restarted runtime)
            self._loop, self._waiting, self._running = loop, [], 0
            self._runners = set()
        waiting = _Waiting(item, loop.create_future())
        self._waiting.append(waiting)
        if self._running < self._in_flight:
            self._running += 1
            runner = loop.create_task(self._run_rounds())
            self._runners.add(runner)  # a reference, so the task is not collected mid-round
            runner.add_done_callback(self._runners.discard)
        # Shielded: a caller that goes away does not take the others' round down with it.
        failure = await asyncio.shield(waiting.done)
        if failure is not None:
            raise failure

    async def _run_rounds(self) -> None:
        try:
            while self._waiting:
                round_, self._waiting = self._waiting, []
                try:
                    outcomes = list(await self._run([w.item for w in round_]))
                except BaseException as exc:  # the round could not even run
                    outcomes = [exc] * len(round_)
                for waiting, outcome in zip(round_, outcomes, strict=True):
                    if not waiting.done.done():
                        waiting.done.set_result(outcome)
        finally:
            self._running -= 1

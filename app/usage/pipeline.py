"""The Redis round trip of metering, shared by admissions and counter corrections.

Per call metering costs one Redis round trip: the corrections `settle` and `release` make are
queued and travel in the same pipeline as the next admission's script (or are sent right
after the call when no admission follows).

One pipeline is in flight at a time: an admission that finds none sends its own at once; the
admissions that arrive meanwhile wait and then travel together in the next one, so under load
a round trip (and a client call) serves many admissions. Scripts go as plain EVALSHA, and one
Redis has lost (a restart) is loaded again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from typing import Any

from redis.exceptions import NoScriptError, RedisError

log = logging.getLogger(__name__)

# Adds ARGV[i + 1] to KEYS[i + 1] when the counter still exists (an expired window stays
# expired), and only while KEYS[1] holds ARGV[1]: the counters' epoch the reservations being
# corrected were made in (`EPOCH_KEY` of app/usage/admission.py). A Redis that lost its data
# since has a new epoch, and counters rebuilt without those reservations.
_ADJUST = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
for i = 2, #KEYS do
  local delta = tonumber(ARGV[i])
  if delta ~= 0 and redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('INCRBY', KEYS[i], delta)
  end
end
return 1
"""

# The first item of an admission script's reply when it refused the call, changing nothing
# (`ADMIT` in app/usage/admission.py).
_REFUSED = (0, 2)

# How long corrections wait for an admission to carry them. Under load one always comes
# sooner; a lone caller's next call usually does too, which saves a Redis call per call.
_CORRECTION_DELAY = 0.02

# An admission to send: counter keys, script arguments, and (when it waits) its answer.
_Pending = tuple[list[str], list[Any], "asyncio.Future[list[Any]] | None"]
_Waiting = tuple[list[str], list[Any], "asyncio.Future[list[Any]]"]
# Corrections to send: per epoch, `_ADJUST`'s keys and arguments.
_Corrections = list[tuple[list[str], list[Any]]]


class CounterPipeline:
    """Runs the admission script and corrects counters, one pipeline in flight at a time."""

    def __init__(self, redis: Any, admit_script: str, *, epoch_key: str, timeout: float) -> None:
        self._redis = redis
        # Bound on each Redis call (the client may have no socket timeout, which would cost a
        # task per command in redis-py).
        self._timeout = timeout
        self._admit_script = redis.register_script(admit_script)
        self._adjust_script = redis.register_script(_ADJUST)
        # Admissions waiting for the pipeline in flight to return, and the one being sent.
        self._admissions: list[_Waiting] = []
        self._in_flight = False
        self._sending: set[asyncio.Task[None]] = set()
        self._epoch_key = epoch_key
        # Epoch -> counter key -> delta not yet sent to Redis (see `correct`).
        self._corrections: dict[str, dict[str, int]] = {}
        self._corrector: asyncio.Task[None] | None = None

    async def admit(self, keys: list[str], args: list[Any]) -> list[Any]:
        """The admission script's answer, sent behind the queued corrections so that it counts
        them and they cost no round trip of their own; raises `RedisError` or `TimeoutError`.
        """
        async with asyncio.timeout(self._timeout):
            if self._in_flight:
                answer: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
                self._admissions.append((keys, args, answer))
                return await answer
            self._in_flight = True
            try:
                (reply,) = await self._round_trip(self._take_corrections(), [(keys, args, None)])
            finally:
                self._in_flight = False
                self._send_waiting()
        if isinstance(reply, Exception):
            raise reply
        result: list[Any] = reply
        return result

    def correct(self, deltas: Iterable[tuple[str, int]], *, epoch: str) -> None:
        """Queue `(counter key, delta)` corrections of reservations made in `epoch`; they reach
        Redis with the next admission's script (no round trip of their own) or, when none
        comes within `_CORRECTION_DELAY`, on their own, and apply only if Redis is still in
        that epoch.

        Until then a counter holds the reservation, the larger amount in the usual case, so a
        limit or budget errs on the side of refusing, never of letting a call through.
        """
        pending = self._corrections.setdefault(epoch, {})
        for key, delta in deltas:
            if delta:
                pending[key] = pending.get(key, 0) + delta
        if not pending:
            del self._corrections[epoch]
        elif self._corrector is None or self._corrector.done():
            self._corrector = asyncio.get_running_loop().create_task(self._correct_soon())

    async def flush(self) -> None:
        """Send the queued corrections now, and wait for any being sent (shutdown)."""
        await self._send_corrections()
        if self._corrector is not None and not self._corrector.done():
            await asyncio.shield(self._corrector)

    async def _correct_soon(self) -> None:
        await asyncio.sleep(_CORRECTION_DELAY)
        await self._send_corrections()

    def _take_corrections(self) -> _Corrections:
        pending, self._corrections = self._corrections, {}
        taken: _Corrections = []
        for epoch, deltas in pending.items():
            keys = [key for key, delta in deltas.items() if delta]
            if keys:
                taken.append(([self._epoch_key, *keys], [epoch, *(deltas[k] for k in keys)]))
        return taken

    async def _send_corrections(self) -> None:
        """Send the queued corrections on their own, as a round of the pipeline: an admission
        arriving meanwhile waits for it, so it counts them whichever connection of the client
        it gets."""
        while self._corrections:
            if self._in_flight:
                # The round under way, or the next, carries them; or this loop does, after it.
                await asyncio.sleep(_CORRECTION_DELAY)
                continue
            self._in_flight = True
            try:
                taken = self._take_corrections()
                async with asyncio.timeout(self._timeout):
                    for keys, args in taken:
                        await self._adjust_script(keys=keys, args=args)
            except (RedisError, TimeoutError):
                # The calls already happened; their records still count once batches are written.
                log.warning("could not correct rate-limit and budget counters", exc_info=True)
            finally:
                self._in_flight = False
                self._send_waiting()

    def _send_waiting(self) -> None:
        if self._in_flight or not self._admissions:
            return
        batch, self._admissions = self._admissions, []
        self._in_flight = True
        # A task of its own: a caller that goes away must not cancel the others' round trip.
        task = asyncio.get_running_loop().create_task(self._run_admissions(batch))
        self._sending.add(task)
        task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        self._in_flight = False
        self._send_waiting()

    async def _run_admissions(self, batch: list[_Waiting]) -> None:
        fixed = self._take_corrections()
        try:
            async with asyncio.timeout(self._timeout):
                replies = await self._round_trip(fixed, batch)
        except BaseException as exc:
            if fixed:
                # Whether they were applied is unknown; sending them again could count twice.
                log.warning("rate-limit and budget corrections may be lost: %d", len(fixed))
            for _, _, answer in batch:
                if answer.done():
                    continue
                if isinstance(exc, Exception):
                    answer.set_exception(exc)
                else:
                    answer.cancel()  # shutting down: the callers are being cancelled too
            if not isinstance(exc, Exception):
                raise
            return
        for (_, _, answer), reply in zip(batch, replies, strict=True):
            if answer.done():
                continue  # its caller went away
            if isinstance(reply, Exception):
                answer.set_exception(reply)
            else:
                answer.set_result(reply)

    async def _round_trip(self, fixed: _Corrections, batch: Sequence[_Pending]) -> list[Any]:
        # Plain EVALSHA: a pipeline given the script objects would first ask SCRIPT EXISTS,
        # a round trip of its own; a script Redis lost (restart) is loaded below instead.
        pipe = self._redis.pipeline(transaction=False)
        for keys, args in fixed:
            pipe.evalsha(self._adjust_script.sha, len(keys), *keys, *args)
        for keys, args, _ in batch:
            pipe.evalsha(self._admit_script.sha, len(keys), *keys, *args)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        corrected_late = False
        for keys, args in fixed:
            adjusted = replies.pop(0)
            if isinstance(adjusted, NoScriptError):
                try:
                    adjusted = await self._adjust_script(keys=keys, args=args)
                except RedisError as exc:
                    adjusted = exc
                else:
                    # The admissions ran before these corrections: a refused one (which
                    # changed nothing) is asked again now that they are counted.
                    corrected_late = True
            if isinstance(adjusted, Exception):
                log.warning("could not correct rate-limit and budget counters: %s", adjusted)
        for index, (keys, args, _) in enumerate(batch):
            reply = replies[index]
            if isinstance(reply, NoScriptError) or (
                corrected_late and isinstance(reply, list) and reply[0] in _REFUSED
            ):
                try:
                    replies[index] = await self._admit_script(keys=keys, args=args)
                except RedisError as exc:
                    replies[index] = exc
        return replies

"""Group commit: entities added by concurrent callers go to storage together.

Each caller waits until its own entity is committed, as with a unit of work of its own, but
callers that arrive while one round is being written are written by the next round in one
statement. Under load a round carries many rows for the price of one statement and one commit;
a lone caller is written at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic

from app.core.errors import DomainError
from app.storage.protocol import E, Storage


@dataclass(slots=True)
class _Waiting(Generic[E]):
    entity: E
    done: asyncio.Future[BaseException | None]


class GroupInsert(Generic[E]):
    """Inserts of one entity type, grouped (see the module docstring)."""

    def __init__(self, storage: Storage, entity_type: type[E]) -> None:
        self._storage = storage
        self._type = entity_type
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting: list[_Waiting[E]] = []
        self._writing = False
        self._writer: asyncio.Task[None] | None = None

    async def add(self, entity: E) -> None:
        """Insert `entity`; returns once it is committed, raises what its insert raised."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new event loop (tests, a restarted runtime)
            self._loop, self._waiting, self._writing = loop, [], False
        waiting = _Waiting(entity, loop.create_future())
        self._waiting.append(waiting)
        if not self._writing:
            self._writing = True
            self._writer = loop.create_task(self._write())
        # Shielded: a caller that goes away does not take the others' round down with it.
        failure = await asyncio.shield(waiting.done)
        if failure is not None:
            raise failure

    async def _write(self) -> None:
        try:
            while self._waiting:
                round_, self._waiting = self._waiting, []
                failures = await self._insert([w.entity for w in round_])
                for waiting, failure in zip(round_, failures, strict=True):
                    if not waiting.done.done():
                        waiting.done.set_result(failure)
        finally:
            self._writing = False

    async def _insert(self, entities: Sequence[E]) -> list[BaseException | None]:
        try:
            async with self._storage.unit_of_work(autocommit=True) as uow:
                await uow.repo(self._type).add_many(entities)
            return [None] * len(entities)
        except DomainError as exc:
            if len(entities) == 1:
                return [exc]
        except Exception as exc:  # the database is down, say: every insert of the round failed
            return [exc] * len(entities)
        # One of them is refused (a taken key): the round wrote nothing, so each goes alone
        # and only the refused one fails.
        failures: list[BaseException | None] = []
        for entity in entities:
            try:
                async with self._storage.unit_of_work(autocommit=True) as uow:
                    await uow.repo(self._type).add(entity)
                failures.append(None)
            except Exception as exc:
                failures.append(exc)
        return failures

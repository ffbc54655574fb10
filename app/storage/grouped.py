"""Group commit: entities added by concurrent callers go to storage together.

Each caller waits until its own entity is committed, as with a unit of work of its own, but
callers that arrive while rounds are being written are written by the next round in one
statement (`app.core.rounds`). What follows a commit (`then`: a job's send) is done by the
round for all of its entities at once, before their callers return.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic

from app.core.errors import DomainError
from app.core.rounds import Rounds
from app.storage.protocol import E, Storage

log = logging.getLogger(__name__)


class GroupInsert(Generic[E]):
    """Inserts of one entity type, grouped (see the module docstring)."""

    def __init__(
        self,
        storage: Storage,
        entity_type: type[E],
        *,
        in_flight: int = 1,
        then: Callable[[list[E]], Awaitable[None]] | None = None,
    ) -> None:
        """`in_flight`: how many rounds may be written at once (each on a connection of its
        own); `then`: what to do with the entities of a round once they are committed, which
        must not raise (their callers are told they were added either way)."""
        self._storage = storage
        self._type = entity_type
        self._then = then
        self._rounds: Rounds[E] = Rounds(self._round, in_flight=in_flight)

    async def add(self, entity: E) -> None:
        """Insert `entity`; returns once it is committed, raises what its insert raised."""
        await self._rounds.submit(entity)

    async def _round(self, entities: Sequence[E]) -> list[BaseException | None]:
        outcomes = await self._insert(entities)
        if self._then is not None:
            added = [e for e, failed in zip(entities, outcomes, strict=True) if failed is None]
            if added:
                try:
                    await self._then(added)
                except Exception:  # they are committed: their callers are told so
                    log.exception("what follows the insert of %d rows failed", len(added))
        return outcomes

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

"""Group commit: entities added by concurrent callers go to storage together.

Each caller waits until its own entity is committed, as with a unit of work of its own, but
callers that arrive while one round is being written are written by the next round in one
statement (`app.core.rounds`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic

from app.core.errors import DomainError
from app.core.rounds import Rounds
from app.storage.protocol import E, Storage


class GroupInsert(Generic[E]):
    """Inserts of one entity type, grouped (see the module docstring)."""

    def __init__(self, storage: Storage, entity_type: type[E]) -> None:
        self._storage = storage
        self._type = entity_type
        self._rounds: Rounds[E] = Rounds(self._insert)

    async def add(self, entity: E) -> None:
        """Insert `entity`; returns once it is committed, raises what its insert raised."""
        await self._rounds.submit(entity)

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

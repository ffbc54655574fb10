"""The reads every service makes the same way: one entity the caller named, or one page.

A key the caller gave that matches no row is the caller's mistake, a `NotFound` naming the
kind of thing asked for (`"credential"`, `"api key"`) and, where given, the parameter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from app.core.errors import NotFound
from app.storage.protocol import E, Page, Repository, Storage, Where


async def get_existing(
    repo: Repository[E], entity_id: Any, kind: str, *, param: str | None = None
) -> E:
    """The entity with this key, inside the caller's unit of work; else `NotFound`."""
    entity = await repo.get(entity_id)
    if entity is None:
        raise NotFound(kind, entity_id, param=param)
    return entity


async def read_existing(
    storage: Storage, entity: type[E], entity_id: Any, kind: str, *, param: str | None = None
) -> E:
    """`get_existing` in a unit of work of its own: a service's plain `get`."""
    async with storage.unit_of_work() as uow:
        return await get_existing(uow.repo(entity), entity_id, kind, param=param)


async def delete_existing(
    repo: Repository[E], entity_id: Any, kind: str, *, param: str | None = None
) -> None:
    """Delete the entity with this key inside the caller's unit of work; else `NotFound`."""
    if not await repo.delete(entity_id):
        raise NotFound(kind, entity_id, param=param)


async def read_page(
    storage: Storage,
    entity: type[E],
    *where: Where,
    order_by: Sequence[str],
    limit: int | None,
    after: str | None,
) -> Page[E]:
    """One page of `find` in a unit of work of its own: a service's list endpoint."""
    async with storage.unit_of_work() as uow:
        return await uow.repo(entity).find(*where, order_by=order_by, limit=limit, after=after)

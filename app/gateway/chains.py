"""Model chains: admin CRUD over the ordered fallbacks clients can name in `model`."""

from __future__ import annotations

from collections.abc import Callable

from app.core.errors import Conflict, InvalidInput
from app.gateway.schemas import ChainCreate, ChainStep, ChainUpdate
from app.models.entities import Model, ModelChain
from app.storage.protocol import Storage, UnitOfWork
from app.storage.reads import delete_existing, get_existing, read_existing


class ChainService:
    """Creates, changes and removes chains; every change drops this process's cached route."""

    def __init__(self, storage: Storage, *, on_change: Callable[[str], None]) -> None:
        self._storage = storage
        self._on_change = on_change

    async def list_chains(self) -> list[ModelChain]:
        async with self._storage.unit_of_work() as uow:
            return (await uow.repo(ModelChain).find(order_by=("id",))).items

    async def get(self, chain_id: str) -> ModelChain:
        return await read_existing(self._storage, ModelChain, chain_id, "chain")

    async def create(self, data: ChainCreate) -> ModelChain:
        async with self._storage.unit_of_work() as uow:
            if await uow.repo(Model).get(data.id) is not None:
                raise Conflict(
                    f"a model named '{data.id}' exists; a chain needs its own name", param="id"
                )
            await self._check_steps(uow, data.steps)
            chain = ModelChain(
                id=data.id,
                name=data.name,
                description=data.description,
                steps=[s.model_dump() for s in data.steps],
                enabled=data.enabled,
            )
            chain = await uow.repo(ModelChain).add(chain)
            await uow.commit()
        self._on_change(chain.id)
        return chain

    async def update(self, chain_id: str, data: ChainUpdate) -> ModelChain:
        async with self._storage.unit_of_work() as uow:
            chain = await get_existing(uow.repo(ModelChain), chain_id, "chain")
            changes = data.model_dump(exclude_unset=True)
            if data.steps is not None:
                await self._check_steps(uow, data.steps)
                changes["steps"] = [s.model_dump() for s in data.steps]
            for name, value in changes.items():
                if value is None and name != "description":
                    raise InvalidInput(f"{name} cannot be null", param=name)
                setattr(chain, name, value)
            chain = await uow.repo(ModelChain).update(chain)
            await uow.commit()
        self._on_change(chain_id)
        return chain

    async def delete(self, chain_id: str) -> None:
        async with self._storage.unit_of_work() as uow:
            await delete_existing(uow.repo(ModelChain), chain_id, "chain")
            await uow.commit()
        self._on_change(chain_id)

    @staticmethod
    async def _check_steps(uow: UnitOfWork, steps: list[ChainStep]) -> None:
        ids = [s.model_id for s in steps]
        found = {m.id: m for m in await uow.repo(Model).get_many(ids)}
        for index, step in enumerate(steps):
            if step.model_id not in found:
                raise InvalidInput(
                    f"model '{step.model_id}' does not exist", param=f"steps.{index}.model_id"
                )
        if len({found[i].kind for i in ids}) > 1:
            raise InvalidInput("a chain's models must all be chat or all embedding", param="steps")

"""PostgreSQL refuses NUL characters in text and jsonb: that is bad input naming the column,
never an unexpected error (the memory backend has no such limit)."""

from __future__ import annotations

import pytest

from app.core.errors import InvalidInput
from app.operations.entities import Operation, OperationStatus
from app.queue.names import OperationKind
from app.storage.protocol import Where
from app.storage.sql import SqlStorage

pytestmark = pytest.mark.postgres


@pytest.fixture
def storage(sql_storage: SqlStorage) -> SqlStorage:
    return sql_storage


def operation(**overrides: object) -> Operation:
    values: dict[str, object] = {
        "id": "op-nul-0001",
        "kind": OperationKind.CHAT_COMPLETION,
        "status": OperationStatus.PENDING,
        "queue": "chat",
        "owner_key_id": "key-alice",
        "input": {"messages": [{"role": "user", "content": "hi"}]},
        **overrides,
    }
    return Operation.model_validate(values)


@pytest.mark.parametrize(
    ("overrides", "param"),
    [
        ({"owner_key_id": "key-\x00alice"}, "owner_key_id"),
        ({"input": {"messages": [{"role": "user", "content": "a\x00b"}]}}, "input"),
    ],
)
async def test_a_nul_in_a_written_value_is_invalid_input_naming_the_column(
    storage: SqlStorage, overrides: dict[str, object], param: str
) -> None:
    with pytest.raises(InvalidInput) as refused:
        async with storage.unit_of_work() as uow:
            await uow.repo(Operation).add(operation(**overrides))
            await uow.commit()
    assert refused.value.param == param and "NUL" in refused.value.message


async def test_a_nul_in_a_looked_up_id_or_a_filter_is_invalid_input(storage: SqlStorage) -> None:
    async with storage.unit_of_work() as uow:
        with pytest.raises(InvalidInput) as by_id:
            await uow.repo(Operation).get("op-\x00")
    assert by_id.value.param == "id"
    async with storage.unit_of_work() as uow:
        with pytest.raises(InvalidInput) as by_filter:
            await uow.repo(Operation).find(Where.eq("owner_key_id", "key-\x00"))
    assert by_filter.value.param == "owner_key_id"

"""A job input that cannot be serialized is refused as bad input, on both backends."""

from __future__ import annotations

import pytest

from app.core.errors import InvalidInput
from app.operations.entities import Operation
from app.operations.service import OperationService
from app.operations.submit import Owner
from app.queue.names import OperationKind
from app.storage.protocol import Storage, Where
from tests.fakes import RecordingQueue


async def test_an_integer_past_64_bits_is_invalid_input_and_nothing_is_stored(
    storage: Storage,
) -> None:
    queue = RecordingQueue(storage)
    service = OperationService(storage, queue)
    with pytest.raises(InvalidInput) as refused:
        await service.submit(
            kind=OperationKind.WEBHOOK_DELIVERY,
            input={"payload": {"counts": [1, 10**40]}},
            owner=Owner(key_id="key-alice"),
            idempotency_key="same-key",
        )
    assert refused.value.param == "payload.counts.1"
    async with storage.unit_of_work() as uow:
        assert await uow.repo(Operation).count(Where.eq("owner_key_id", "key-alice")) == 0
    assert queue.ids() == []

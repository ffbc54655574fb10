"""Hand-written fakes of the ports, for tests of the services without a broker."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from app.core.errors import Unavailable
from app.operations.entities import Operation
from app.queue.names import OperationKind
from app.storage.protocol import Storage


@dataclass
class Sent:
    operation_id: str
    kind: OperationKind
    delay: float
    row_existed: bool


@dataclass
class RecordingQueue:
    """Records every send; `down` makes sends fail like an unreachable broker, and `waiting`
    is what it says the queues hold (when the oldest message of each kind's was sent)."""

    storage: Storage
    down: bool = False
    sent: list[Sent] = field(default_factory=list)
    waiting: dict[OperationKind, datetime] = field(default_factory=dict)

    async def send(self, operation_id: str, kind: OperationKind, *, delay: float = 0.0) -> None:
        if self.down:
            raise Unavailable("broker down (fake)")
        async with self.storage.unit_of_work() as uow:
            exists = await uow.repo(Operation).get(operation_id) is not None
        self.sent.append(Sent(operation_id, kind, delay, exists))

    async def waiting_since(self) -> dict[OperationKind, datetime]:
        if self.down:
            raise Unavailable("broker down (fake)")
        return dict(self.waiting)

    def ids(self) -> list[str]:
        return [s.operation_id for s in self.sent]

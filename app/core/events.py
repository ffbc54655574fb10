"""The seam through which any domain emits an event inside its own unit of work."""

from __future__ import annotations

from typing import Any, Protocol


class EventSink(Protocol):
    """Records an event in `uow`, so it commits (or rolls back) with the change that caused it.

    `uow` is the caller's `app.storage.protocol.UnitOfWork`, passed through untouched: typed
    `Any` here because `app.core` sits below `app.storage`; a sink annotates it as the
    `UnitOfWork` it writes to.
    """

    async def record(self, uow: Any, event_type: str, data: dict[str, Any]) -> None: ...

    async def interested(self, event_type: str) -> bool:
        """Whether anyone may want `event_type` now; when not, a change can skip recording it
        (and the transaction recording would need). When unsure, True."""
        ...


class NullSink:
    """Drops every event: for services built without a subscriber of events."""

    async def record(self, uow: Any, event_type: str, data: dict[str, Any]) -> None:
        return None

    async def interested(self, event_type: str) -> bool:
        return False

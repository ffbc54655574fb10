"""Long-running processes settle their heap once started (`app.core.heap`)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from app.config import Settings
from app.core import heap
from app.main import create_app
from app.storage.memory import MemoryStorage
from tests.fakes import RecordingQueue


@pytest.fixture
def restored_collector() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def test_settling_freezes_what_is_alive_and_makes_collections_rarer(
    restored_collector: None,
) -> None:
    alive = {"built": ["at", "start-up"]}
    heap.settle()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == heap.THRESHOLDS
    assert alive["built"] == ["at", "start-up"]


@pytest.mark.parametrize("enabled", [True, False])
async def test_the_api_settles_its_heap_once_started_unless_told_not_to(
    monkeypatch: pytest.MonkeyPatch, enabled: bool
) -> None:
    settled: list[bool] = []
    monkeypatch.setattr(heap, "settle", lambda: settled.append(True))
    storage = MemoryStorage()
    app = create_app(
        Settings(BROKER="stub", GC_SETTLE=enabled), storage=storage, queue=RecordingQueue(storage)
    )
    async with app.router.lifespan_context(app):
        assert settled == ([True] if enabled else [])

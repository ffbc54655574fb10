"""The worker's actors: one per job kind, on its queue, found by the names messages carry."""

from __future__ import annotations

import asyncio
import importlib
from types import ModuleType, SimpleNamespace

import dramatiq
import pytest
from dramatiq.brokers.stub import StubBroker

from app.config import Settings
from app.queue.broker import build_broker
from app.queue.names import ACTORS, QUEUES
from app.queue.port import DramatiqQueue
from workers import runtime

STUB = Settings(PROCESS_ROLE="dev", BROKER="stub")


@pytest.fixture
def actors(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """`workers.actors` imported as Dramatiq's CLI imports it, leaving this process as it was
    (its import sets the global broker and the event loop policy)."""
    monkeypatch.setattr(runtime, "_settings", STUB)
    monkeypatch.setattr(dramatiq.broker, "global_broker", dramatiq.broker.global_broker)
    policy = asyncio.get_event_loop_policy()
    try:
        return importlib.import_module("workers.actors")
    finally:
        asyncio.set_event_loop_policy(policy)


@pytest.fixture
def broker(actors: ModuleType) -> StubBroker:
    broker = build_broker(STUB)
    assert isinstance(broker, StubBroker)
    actors.bind(broker)
    return broker


def test_importing_the_actors_declares_them_all_on_the_global_broker(actors: ModuleType) -> None:
    declared = set(dramatiq.get_broker().get_declared_actors())

    assert set(ACTORS.values()) <= declared


def test_every_queued_kind_has_one_actor_on_its_own_queue(broker: StubBroker) -> None:
    assert set(broker.get_declared_actors()) == set(ACTORS.values())
    for kind, queue in QUEUES.items():
        actor = broker.get_actor(ACTORS[kind])
        assert actor.queue_name == queue
        # The job engine retries (and records it on the job); Dramatiq must not.
        assert actor.options["max_retries"] == 0
        assert actor.options["time_limit"] > 0


async def test_a_job_sent_for_each_kind_runs_from_its_kinds_queue(
    broker: StubBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    executed: list[str] = []

    async def execute(operation_id: str) -> None:
        executed.append(operation_id)

    fake = SimpleNamespace(runner=SimpleNamespace(execute=execute))
    monkeypatch.setattr(runtime, "get_runtime", lambda: fake)
    sender = DramatiqQueue(broker)
    for kind in QUEUES:
        await sender.send(f"op_{kind}", kind)

    def drain(queue: str) -> None:
        # A worker on this queue only: the job it runs was on this queue.
        worker = dramatiq.Worker(broker, queues={queue}, worker_threads=1, worker_timeout=50)
        worker.start()
        try:
            broker.join(queue, fail_fast=True)
            worker.join()
        finally:
            worker.stop()

    for kind, queue in QUEUES.items():
        executed.clear()
        await asyncio.to_thread(drain, queue)
        assert executed == [f"op_{kind}"], queue

"""Experiment batches: a job runs every dataset item through every variant on the one call
path, records each pair once, resumes without repeating a recorded pair, and stops when
cancelled (both backends; the job run by an in-process runner, as a worker would)."""

from __future__ import annotations

import asyncio
from typing import Any

from app.core.ids import new_id
from app.experiments.entities import ExperimentRecord, RecordSource
from app.operations.entities import Operation, OperationStatus
from app.operations.runner import OperationRunner
from app.services import build_handlers
from app.storage.protocol import Where
from app.usage.entities import UsageRecord
from tests.experiments.conftest import ADMIN, FAST, Gateway, experiment, mock_model, variant


def items(n: int) -> list[dict[str, Any]]:
    return [
        {"input": {"messages": [{"role": "user", "content": f"question {i}"}]}, "expected": str(i)}
        for i in range(n)
    ]


async def batch(gateway: Gateway, n_items: int = 5, **body: Any) -> dict[str, Any]:
    await gateway.post("/admin/datasets", {"id": "qs", "name": "Q", "items": items(n_items)}, 201)
    response = await gateway.http.post(
        "/admin/experiments/exp/batches",
        json={"dataset_id": "qs", **body},
        headers=ADMIN,
    )
    assert response.status_code == 202, response.text
    assert response.headers["location"] == f"/v1/operations/{response.json()['operation_id']}"
    accepted: dict[str, Any] = response.json()
    return accepted


async def operation(gateway: Gateway, operation_id: str) -> Operation:
    async with gateway.storage.unit_of_work() as uow:
        found = await uow.repo(Operation).get(operation_id)
    assert found is not None
    return found


async def usage_of(gateway: Gateway, operation_id: str) -> int:
    async with gateway.storage.unit_of_work() as uow:
        return await uow.repo(UsageRecord).count(Where.eq("operation_id", operation_id))


async def test_a_batch_runs_every_item_through_every_variant_once(gateway: Gateway) -> None:
    await gateway.running(experiment())

    accepted = await batch(gateway, concurrency=3)

    assert accepted["total"] == 10 and accepted["status"] == "pending"
    assert await gateway.run_jobs() == 1
    job = await operation(gateway, accepted["operation_id"])
    assert job.status == OperationStatus.COMPLETED, job.error_message
    assert job.result is not None
    assert (job.result["recorded"], job.result["succeeded"], job.result["failed"]) == (10, 10, 0)
    assert job.progress == {"done": 10, "total": 10}
    records = await gateway.records(Where.eq("operation_id", accepted["operation_id"]))
    assert len({(r.item_id, r.variant_id) for r in records}) == 10
    for record in records:
        assert record.source is RecordSource.OFFLINE and record.success
        assert record.model_id == ("other" if record.variant_id == "other" else "base")
        assert record.output is not None and record.output.startswith("Mock reply to: question")
        assert (record.input_tokens, record.output_tokens, record.cost_micros) == (5, 7, 80)
    assert await usage_of(gateway, accepted["operation_id"]) == 10
    results = await gateway.get(
        f"/admin/experiments/exp/results?operation_id={accepted['operation_id']}"
    )
    assert results["source"] == "offline" and results["total"] == 10
    # Every item ran through both variants: they are compared on the same items.
    tests = {c["metric"]: (c["test"], c["pairs"]) for c in results["comparisons"]}
    assert tests["success_rate"] == ("mcnemar_exact", 5)
    assert tests["latency_ms"] == tests["cost_micros"] == ("paired_t", 5)
    by_item = {(r.item_id, r.variant_id): r for r in records}
    for (item_id, variant_id), record in by_item.items():
        if variant_id == "other":
            control = by_item[(item_id, "control")]
            assert record.latency_ms_diff == record.latency_ms - control.latency_ms
            assert (record.success_diff, record.cost_micros_diff) == (0, 0)
        else:
            assert record.latency_ms_diff is None
    assert (await gateway.get("/admin/experiments/exp/results"))["total"] == 0


async def test_a_batch_run_again_makes_only_the_calls_not_yet_recorded(gateway: Gateway) -> None:
    await gateway.running(experiment())
    accepted = await batch(gateway)
    operation_id = accepted["operation_id"]
    # What a first attempt, killed mid-run, left behind: three pairs recorded.
    done = (await gateway.get("/admin/datasets/qs/items"))["data"][:3]
    async with gateway.storage.unit_of_work() as uow:
        for item in done:
            await uow.repo(ExperimentRecord).add(
                ExperimentRecord(
                    id=new_id("expr"),
                    experiment_id="exp",
                    variant_id="control",
                    source=RecordSource.OFFLINE,
                    operation_id=operation_id,
                    item_id=item["id"],
                    output="from the first attempt",
                )
            )
        await uow.commit()

    await gateway.run_jobs()

    job = await operation(gateway, operation_id)
    assert job.status == OperationStatus.COMPLETED and job.result is not None
    assert job.result["recorded"] == 10
    assert await usage_of(gateway, operation_id) == 7, "a recorded pair was called again"
    records = await gateway.records(Where.eq("operation_id", operation_id))
    kept = [r for r in records if r.output == "from the first attempt"]
    assert {r.item_id for r in kept} == {i["id"] for i in done}


async def test_a_cancelled_batch_stops_calling(gateway: Gateway) -> None:
    await gateway.post("/admin/models", mock_model("slow", mock_latency_ms=150), 201)
    await gateway.running(
        experiment(
            target="slow",
            variants=[
                variant("control", 50, control=True),
                variant("warm", 50, params={"temperature": 1}),
            ],
        )
    )
    accepted = await batch(gateway, n_items=20, concurrency=1)
    operation_id = accepted["operation_id"]
    runner = OperationRunner(
        gateway.storage, gateway.queue, build_handlers(gateway.services), timings=FAST
    )
    gateway.queue.sent.clear()
    running = asyncio.create_task(runner.execute(operation_id))
    for _ in range(200):
        if len(await gateway.records(Where.eq("operation_id", operation_id))) >= 2:
            break
        await asyncio.sleep(0.05)

    cancelled = await gateway.http.delete(
        f"/v1/operations/{operation_id}",
        headers=ADMIN,
    )
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    await asyncio.wait_for(running, 10)
    made = len(await gateway.records(Where.eq("operation_id", operation_id)))
    await asyncio.sleep(0.4)

    assert 2 <= made < 40
    assert len(await gateway.records(Where.eq("operation_id", operation_id))) == made
    assert (await operation(gateway, operation_id)).status == OperationStatus.CANCELLED


async def test_a_batch_refuses_what_it_cannot_run(gateway: Gateway) -> None:
    await gateway.running(experiment())
    await gateway.post("/admin/datasets", {"id": "empty", "name": "E"}, 201)
    await gateway.post("/admin/datasets", {"id": "one", "name": "O", "items": items(1)}, 201)

    for body, status, param in (
        ({"dataset_id": "nope"}, 404, "dataset_id"),
        ({"dataset_id": "empty"}, 400, "dataset_id"),
        ({"dataset_id": "one", "model": "other"}, 400, "model"),
        ({"dataset_id": "empty", "concurrency": 0}, 400, "concurrency"),
    ):
        refused = await gateway.post("/admin/experiments/exp/batches", body, status)
        assert refused["error"]["param"] == param, body
    await gateway.post(
        "/admin/experiments", experiment("on-prompt", target_kind="prompt", target="p"), 201
    )
    needs_model = await gateway.post(
        "/admin/experiments/on-prompt/batches", {"dataset_id": "one"}, 400
    )
    assert needs_model["error"]["param"] == "model"
    await gateway.post("/admin/experiments/exp/complete")
    await gateway.post("/admin/experiments/exp/batches", {"dataset_id": "one"}, 409)


async def test_a_batch_runs_on_the_dataset_version_it_was_submitted_on(
    gateway: Gateway,
) -> None:
    await gateway.running(experiment())
    accepted = await batch(gateway, n_items=3)
    operation_id = accepted["operation_id"]
    first, second, _ = (await gateway.get("/admin/datasets/qs/items"))["data"]
    # A first attempt recorded the first item, then the dataset changed under the batch.
    async with gateway.storage.unit_of_work() as uow:
        for variant_id in ("control", "other"):
            await uow.repo(ExperimentRecord).add(
                ExperimentRecord(
                    id=new_id("expr"),
                    experiment_id="exp",
                    variant_id=variant_id,
                    source=RecordSource.OFFLINE,
                    operation_id=operation_id,
                    item_id=first["id"],
                )
            )
        await uow.commit()
    await gateway.post("/admin/datasets/qs/items", {"items": items(2)})
    await gateway.delete(f"/admin/datasets/qs/items/{first['id']}")
    changed = {"input": {"messages": [{"role": "user", "content": "changed"}]}}
    await gateway.patch(f"/admin/datasets/qs/items/{second['id']}", changed)
    assert (await gateway.get("/admin/datasets/qs"))["version"] == 4

    await gateway.run_jobs()

    job = await operation(gateway, operation_id)
    assert job.status == OperationStatus.COMPLETED, job.error_message
    assert job.result is not None and job.result["dataset_version"] == 1
    assert (job.result["total"], job.result["recorded"]) == (6, 6)
    records = await gateway.records(Where.eq("operation_id", operation_id))
    assert {r.item_id for r in records} == {i["id"] for i in (first, second, _)}
    made = [r for r in records if r.item_id == second["id"]]
    assert all("question 1" in (r.output or "") for r in made), "ran the item as it is now"
    assert await usage_of(gateway, operation_id) == 4


async def test_a_batch_can_run_an_earlier_version(gateway: Gateway) -> None:
    await gateway.running(experiment())
    await batch(gateway, n_items=2)
    await gateway.post("/admin/datasets/qs/items", {"items": items(3)})

    older = await gateway.post(
        "/admin/experiments/exp/batches", {"dataset_id": "qs", "dataset_version": 1}, 202
    )
    missing = await gateway.post(
        "/admin/experiments/exp/batches", {"dataset_id": "qs", "dataset_version": 9}, 404
    )

    assert older["total"] == 4
    assert missing["error"]["param"] == "dataset_version"


async def test_an_item_a_variant_cannot_make_is_recorded_as_its_failure(gateway: Gateway) -> None:
    await gateway.running(
        experiment(
            variants=[variant("control", 50, control=True), variant("broken", 50, model="broken")]
        )
    )
    variables = {"input": {"variables": {"name": "Ada"}}}
    await gateway.post(
        "/admin/datasets", {"id": "qs", "name": "Q", "items": [*items(1), variables]}, 201
    )
    accepted = await gateway.post("/admin/experiments/exp/batches", {"dataset_id": "qs"}, 202)

    await gateway.run_jobs()

    job = await operation(gateway, accepted["operation_id"])
    assert job.status == OperationStatus.COMPLETED and job.result is not None
    assert (job.result["succeeded"], job.result["failed"]) == (1, 3)
    records = await gateway.records(Where.eq("operation_id", accepted["operation_id"]))
    errors = sorted(r.error or "" for r in records if not r.success)
    assert sum("simulated 400" in e for e in errors) == 1
    assert sum("not on a prompt" in e for e in errors) == 2

"""`/admin/experiments`: a design is checked field by field, the lifecycle refuses illegal
moves, and what an experiment measures cannot change once it started (both backends)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.experiments.conftest import Gateway, experiment, variant


async def test_a_new_experiment_is_a_draft_with_a_salt_and_its_variants(
    gateway: Gateway,
) -> None:
    created = await gateway.post("/admin/experiments", experiment(), 201)

    assert created["status"] == "draft" and created["unit"] == "api_key"
    assert len(created["salt"]) == 16
    assert [(v["id"], v["control"], v["allocation"]) for v in created["variants"]] == [
        ("control", True, 50.0),
        ("other", False, 50.0),
    ]
    assert created["variants"][1]["params"] == {"temperature": 0.2}
    assert await gateway.get("/admin/experiments/exp") == created
    listed = await gateway.get("/admin/experiments?status=draft")
    assert [e["id"] for e in listed["data"]] == ["exp"]
    await gateway.post("/admin/experiments", experiment(), 409)


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"variants": [variant("a", 50, control=True), variant("b", 40)]}, "variants"),
        (
            {"variants": [variant("a", 50, control=True), variant("b", 50, control=True)]},
            "variants",
        ),
        ({"variants": [variant("a", 50), variant("b", 50)]}, "variants"),
        ({"variants": [variant("a", 50, control=True), variant("a", 50)]}, "variants.1.id"),
        (
            {"variants": [variant("a", 50, control=True), variant("b", 50, prompt_version=2)]},
            "variants.1.prompt_version",
        ),
        (
            {"variants": [variant("a", 33.333, control=True), variant("b", 66.667)]},
            "variants.0.allocation",
        ),
        (
            {
                "variants": [
                    variant("a", 50, control=True),
                    variant("b", 50, params={"temperature": 3}),
                ]
            },
            "variants.1.params.temperature",
        ),
        (
            {"variants": [variant("a", 50, control=True), variant("b", 50, params={"top_k": 3})]},
            "variants.1.params.top_k",
        ),
        ({"variants": [variant("a", 100, control=True)]}, "variants"),
        ({"unit": "ip_address"}, "unit"),
        ({"id": "no spaces"}, "id"),
        ({"minimum_effect": -1}, "minimum_effect"),
    ],
)
async def test_a_design_that_is_not_one_experiment_is_refused_naming_the_field(
    gateway: Gateway, change: dict[str, Any], param: str
) -> None:
    refused = await gateway.post("/admin/experiments", experiment(**change), 400)

    assert refused["error"]["param"] == param


async def test_allocations_to_the_hundredth_that_sum_to_100_are_taken(gateway: Gateway) -> None:
    variants = [variant("a", 33.34, control=True), variant("b", 33.33), variant("c", 33.33)]
    created = await gateway.post("/admin/experiments", experiment(variants=variants), 201)

    assert [v["allocation"] for v in created["variants"]] == [33.34, 33.33, 33.33]


async def test_the_lifecycle_goes_draft_running_paused_running_completed_and_no_other_way(
    gateway: Gateway,
) -> None:
    await gateway.post("/admin/experiments", experiment(), 201)
    base = "/admin/experiments/exp"
    for illegal in ("pause", "resume", "complete"):
        refused = await gateway.post(f"{base}/{illegal}", status=409)
        assert refused["error"]["code"] == "illegal_transition"

    started = await gateway.post(f"{base}/start")
    assert started["status"] == "running" and started["started_at"] is not None
    await gateway.post(f"{base}/start", status=409)
    await gateway.post(f"{base}/resume", status=409)
    assert (await gateway.post(f"{base}/pause"))["status"] == "paused"
    await gateway.post(f"{base}/pause", status=409)
    assert (await gateway.post(f"{base}/resume"))["status"] == "running"
    completed = await gateway.post(f"{base}/complete")
    assert completed["status"] == "completed" and completed["completed_at"] is not None
    for illegal in ("start", "pause", "resume", "complete"):
        await gateway.post(f"{base}/{illegal}", status=409)


async def test_a_started_experiment_changes_only_its_name_and_description(
    gateway: Gateway,
) -> None:
    await gateway.post("/admin/experiments", experiment(), 201)
    base = "/admin/experiments/exp"
    draft = await gateway.patch(
        base, {"salt": "s2", "variants": [variant("a", 30, control=True), variant("b", 70)]}
    )
    assert draft["salt"] == "s2" and draft["variants"][1]["allocation"] == 70
    await gateway.post(f"{base}/start")

    for frozen in (
        {"variants": [variant("a", 50, control=True), variant("b", 50)]},
        {"salt": "s3"},
        {"unit": "user"},
        {"target": "other"},
        {"primary_metric": "latency_ms"},
        {"minimum_effect": 5},
    ):
        refused = await gateway.patch(base, frozen, 409)
        assert refused["error"]["param"] == next(iter(frozen))
    renamed = await gateway.patch(base, {"name": "Renamed", "description": "why"})
    assert renamed["name"] == "Renamed" and renamed["salt"] == "s2"


async def test_a_running_experiment_cannot_be_deleted_and_a_paused_one_can(
    gateway: Gateway,
) -> None:
    await gateway.running(experiment())
    await gateway.delete("/admin/experiments/exp", 409)

    await gateway.post("/admin/experiments/exp/pause")
    assert (await gateway.delete("/admin/experiments/exp"))["deleted"] is True
    await gateway.get("/admin/experiments/exp", status=404)


async def test_starting_needs_every_model_named_and_no_other_experiment_on_the_target(
    gateway: Gateway,
) -> None:
    missing = experiment(
        variants=[variant("a", 50, control=True), variant("b", 50, model="no-such-model")]
    )
    await gateway.post("/admin/experiments", missing, 201)
    refused = await gateway.post("/admin/experiments/exp/start", status=400)
    assert refused["error"]["param"] == "variants.1.model"

    await gateway.running(experiment("first"))
    await gateway.post("/admin/experiments", experiment("second"), 201)
    overlap = await gateway.post("/admin/experiments/second/start", status=409)
    assert overlap["error"]["param"] == "target"
    await gateway.post("/admin/experiments/first/pause")
    assert (await gateway.post("/admin/experiments/second/start"))["status"] == "running"
    await gateway.post("/admin/experiments/first/resume", status=409)


async def test_experiments_are_for_administrators_only(gateway: Gateway) -> None:
    key, _ = await gateway.client_key()

    await gateway.get("/admin/experiments", status=403, headers=key)
    await gateway.post("/admin/experiments", experiment(), 403, headers=key)

"""Results come from rolled-up totals: the same whenever and however often the records were
rolled up, each record counted once even by concurrent roll-ups, feedback given after a
roll-up counted, and a batch's variants compared with control on the same items by paired
tests equal to scipy's (both backends)."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from scipy import stats

from app.core.ids import new_id
from app.experiments.batches import pair
from app.experiments.entities import (
    ExperimentFeedbackChange,
    ExperimentRecord,
    ExperimentTotals,
    ExperimentWatermark,
    RecordSource,
)
from app.experiments.totals import SKETCH_ACCURACY, Totals
from app.storage.protocol import Storage, Where
from tests.experiments.conftest import Gateway, experiment
from tests.experiments.test_results import by, generated, store


async def settled(storage: Storage) -> None:
    """Wait until every record and feedback change committed is below the commit horizon, so
    a roll-up counts it (on a shared PostgreSQL server, a transaction open elsewhere holds
    the horizon back)."""
    stamps = [0]
    async with storage.unit_of_work() as uow:
        for kind in (ExperimentRecord, ExperimentFeedbackChange):
            newest = await uow.repo(kind).find(
                Where.is_null("commit_stamp", False), order_by=["-commit_stamp"], limit=1
            )
            stamps += [e.commit_stamp or 0 for e in newest.items]
    for _ in range(300):
        async with storage.unit_of_work() as uow:
            if await uow.commit_horizon() > max(stamps):
                return
        await asyncio.sleep(0.1)
    raise AssertionError("the commit horizon did not pass the newest record")


def flat(value: Any, path: str = "") -> dict[str, Any]:
    """A nested response as path → leaf, for `pytest.approx`."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in flat(item, f"{path}.{key}").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in flat(item, f"{path}.{i}").items()}
    return {path: value}


async def test_results_are_the_same_however_the_records_were_rolled_up(
    gateway: Gateway,
) -> None:
    await gateway.running(experiment(primary_metric="latency_ms"))
    control, _ = generated("control", 300, success=0.9, latency=500, score=3.0)
    other, _ = generated("other", 240, success=0.8, latency=470, score=3.2)
    everything = control + other
    await store(gateway, everything)
    at_once = await gateway.get("/admin/experiments/exp/results")

    # The same records again, in another experiment, counted seven at a time and with some
    # arriving between two roll-ups.
    await gateway.running(experiment("again", target="other"))
    copies = [
        r.model_copy(update={"id": new_id("expr"), "experiment_id": "again"}) for r in everything
    ]
    small = Totals(gateway.storage, chunk=7)
    await store(gateway, copies[:200])
    await settled(gateway.storage)
    assert await small.roll_up("again") == 200
    await store(gateway, copies[200:])
    piecewise = await gateway.get("/admin/experiments/again/results")

    assert piecewise["total"] == at_once["total"] == 540
    for part in ("variants", "comparisons", "sample_ratio"):
        mine, theirs = flat(piecewise[part]), flat(at_once[part])
        assert mine.keys() == theirs.keys()
        for path, value in theirs.items():
            if isinstance(value, float):
                assert mine[path] == pytest.approx(value, rel=1e-12), path
            else:
                assert mine[path] == value, path
    # The results query wrote nothing: the last 340 records wait, above the watermark.
    await settled(gateway.storage)
    assert await small.roll_up("again") == 340
    async with gateway.storage.unit_of_work() as uow:
        mark = await uow.repo(ExperimentWatermark).get("again")
        assert mark is not None
        waiting = await uow.repo(ExperimentRecord).count(
            Where.eq("experiment_id", "again"), Where.ge("commit_stamp", mark.watermark)
        )
    assert waiting == 0
    assert flat(await gateway.get("/admin/experiments/again/results")) == flat(piecewise)


async def test_concurrent_roll_ups_count_each_record_once(gateway: Gateway) -> None:
    await gateway.running(experiment())
    records, _ = generated("control", 400, success=0.9, latency=500, score=3.0)
    await store(gateway, records)
    await settled(gateway.storage)

    counted = await asyncio.gather(
        *(Totals(gateway.storage, chunk=50).roll_up("exp") for _ in range(3))
    )

    assert sum(counted) == 400
    assert await gateway.services.experiments.roll_up() == 0
    async with gateway.storage.unit_of_work() as uow:
        (totals,) = (await uow.repo(ExperimentTotals).find()).items
    assert totals.calls == 400
    assert totals.units == len({r.unit for r in records})


async def test_feedback_given_after_a_roll_up_still_counts(gateway: Gateway) -> None:
    await gateway.running(experiment())
    records = [
        ExperimentRecord(
            id=new_id("expr"),
            experiment_id="exp",
            variant_id="control" if i % 2 else "other",
            unit=f"u{i}",
            request_id=f"req-{i}",
            latency_ms=100 + i,
            feedback_score=float(i % 5) if i < 10 else None,
            feedback_label="first" if i < 10 else None,
        )
        for i in range(40)
    ]
    await store(gateway, records)
    await settled(gateway.storage)
    assert await gateway.services.experiments.roll_up() == 40
    scores = {r.request_id: r.feedback_score for r in records}
    labels = {r.request_id: r.feedback_label for r in records}
    experiments = gateway.services.experiments
    for i in (1, 3, 13, 15, 17):  # replaced scores and first ones
        await experiments.feedback(key_id=None, request_id=f"req-{i}", score=10.0 + i, label=None)
        scores[f"req-{i}"] = 10.0 + i
    for i in (5, 21):  # a label replaced, a first label
        await experiments.feedback(key_id=None, request_id=f"req-{i}", score=None, label="later")
        labels[f"req-{i}"] = "later"

    results = await gateway.get("/admin/experiments/exp/results")

    (control,) = [v for v in results["variants"] if v["variant_id"] == "control"]
    mine = [r for r in records if r.variant_id == "control"]
    given = np.array([s for r in mine if (s := scores[r.request_id]) is not None])
    score = control["metrics"]["feedback_score"]
    assert score["n"] == len(given)
    assert score["mean"] == pytest.approx(given.mean(), rel=1e-12)
    assert score["sd"] == pytest.approx(given.std(ddof=1), rel=1e-9)
    assert (score["min"], score["max"]) == (given.min(), given.max())
    tally: dict[str, int] = {}
    for r in mine:
        if (label := labels[r.request_id]) is not None:
            tally[label] = tally.get(label, 0) + 1
    assert control["feedback_labels"] == tally
    other = [r for r in records if r.variant_id == "other"]
    theirs = np.array([s for r in other if (s := scores[r.request_id]) is not None])
    compared = by(results, "other", "feedback_score")
    reference = stats.ttest_ind(theirs, given, equal_var=False)
    assert compared["statistic"] == pytest.approx(reference.statistic, rel=1e-9)
    assert compared["p_value"] == pytest.approx(reference.pvalue, rel=1e-9)

    # The feedback to counted records became changes, rolled up like records: the same
    # results once they are.
    await settled(gateway.storage)
    assert await experiments.roll_up() == 7
    assert flat(await gateway.get("/admin/experiments/exp/results")) == flat(results)


def paired_records(operation_id: str, n: int) -> tuple[list[ExperimentRecord], dict[str, Any]]:
    """n items, each through control and other, with the differences the batch runner writes;
    the raw paired values, for scipy."""
    rng = np.random.default_rng(2117)
    records = []
    control_ok = rng.random(n) < 0.7
    other_ok = np.where(rng.random(n) < 0.8, control_ok, ~control_ok)
    base = rng.normal(500, 80, n).round().clip(1).astype(int)
    shift = rng.normal(-15, 40, n).round().astype(int)
    tokens = rng.integers(10, 400, n)
    for i in range(n):
        made = {}
        for variant_id, ok, latency, extra in (
            ("control", control_ok[i], base[i], 0),
            ("other", other_ok[i], max(1, base[i] + shift[i]), i % 7),
        ):
            made[variant_id] = ExperimentRecord(
                id=new_id("expr"),
                experiment_id="exp",
                variant_id=variant_id,
                source=RecordSource.OFFLINE,
                operation_id=operation_id,
                item_id=f"item-{i}",
                unit=f"item-{i}",
                success=bool(ok),
                latency_ms=int(latency),
                input_tokens=int(tokens[i]) + extra,
                output_tokens=int(tokens[i]) // 2,
                cost_micros=(int(tokens[i]) + extra) * 3,
            )
        pair(made["other"], made["control"])
        records.extend(made.values())
    both = control_ok & other_ok
    raw = {
        "control_ok": control_ok,
        "other_ok": other_ok,
        "latency": (np.maximum(1, base + shift)[both], base[both]),
        "input_tokens": ((tokens + np.arange(n) % 7)[both], tokens[both]),
    }
    return records, raw


async def test_a_batch_compares_variants_on_the_same_items_as_scipy_does(
    gateway: Gateway,
) -> None:
    await gateway.running(experiment(primary_metric="latency_ms", minimum_effect=5))
    batch = new_id("op")
    records, raw = paired_records(batch, 150)
    await store(gateway, records)

    results = await gateway.get(f"/admin/experiments/exp/results?operation_id={batch}")

    for metric, (mine, theirs) in (
        ("latency_ms", raw["latency"]),
        ("input_tokens", raw["input_tokens"]),
    ):
        compared = by(results, "other", metric)
        reference = stats.ttest_rel(mine, theirs)
        interval = reference.confidence_interval(0.95)
        assert compared["test"] == "paired_t" and compared["pairs"] == len(mine)
        assert compared["statistic"] == pytest.approx(reference.statistic, rel=1e-9)
        assert compared["p_value"] == pytest.approx(reference.pvalue, rel=1e-9)
        assert compared["df"] == pytest.approx(reference.df, rel=1e-12)
        assert compared["difference"] == pytest.approx((mine - theirs).mean(), rel=1e-12)
        assert compared["ci_low"] == pytest.approx(interval.low, rel=1e-9)
        assert compared["ci_high"] == pytest.approx(interval.high, rel=1e-9)
    rate = by(results, "other", "success_rate")
    control_ok, other_ok = raw["control_ok"], raw["other_ok"]
    b, c = int((other_ok & ~control_ok).sum()), int((~other_ok & control_ok).sum())
    exact = stats.binomtest(b, b + c, 0.5)
    assert rate["test"] == "mcnemar_exact" and rate["pairs"] == 150
    assert rate["p_value"] == pytest.approx(exact.pvalue, rel=1e-9)
    assert rate["statistic"] == min(b, c)
    assert rate["difference"] == pytest.approx((b - c) / 150, rel=1e-12)
    half = stats.norm.ppf(0.975) * np.sqrt(b + c - (b - c) ** 2 / 150) / 150
    assert rate["ci_low"] == pytest.approx((b - c) / 150 - half, rel=1e-9)
    # Feedback has no pairs: it stays Welch's; Holm spans every comparison made.
    assert by(results, "other", "feedback_score")["test"] == "welch_t"
    made = [c for c in results["comparisons"] if c["p_value"] is not None]
    holm = sorted(made, key=lambda c: c["p_value"])
    assert holm[0]["p_adjusted"] == pytest.approx(min(1.0, len(made) * holm[0]["p_value"]))
    live = await gateway.get("/admin/experiments/exp/results")
    assert live["total"] == 0


async def test_latency_percentiles_stay_within_the_sketch_bound(gateway: Gateway) -> None:
    await gateway.running(experiment())
    rng = np.random.default_rng(5)
    latencies = rng.lognormal(6, 1.2, 5000).round().astype(int)
    await store(
        gateway,
        [
            ExperimentRecord(
                id=new_id("expr"),
                experiment_id="exp",
                variant_id="control",
                unit=f"u{i}",
                latency_ms=int(v),
                first_token_ms=int(v) // 4 if i % 3 else None,
            )
            for i, v in enumerate(latencies)
        ],
    )

    results = await gateway.get("/admin/experiments/exp/results")

    control = results["variants"][0]["metrics"]
    for metric, values in (
        ("latency_ms", latencies),
        ("first_token_ms", (latencies // 4)[np.arange(len(latencies)) % 3 != 0]),
    ):
        for q, key in ((0.5, "p50"), (0.95, "p95"), (0.99, "p99")):
            lower = np.quantile(values, q, method="lower")
            assert abs(control[metric][key] - lower) <= SKETCH_ACCURACY * lower, (metric, key)

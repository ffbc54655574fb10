"""`GET /admin/experiments/{id}/results` over stored records equals scipy's numbers computed
from the raw values, flags a skewed split, and names a winner only past the threshold."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from scipy import stats

from app.core.ids import new_id
from app.experiments.entities import ExperimentRecord, RecordSource
from app.experiments.stats import holm
from app.experiments.totals import SKETCH_ACCURACY
from tests.experiments.conftest import Gateway, experiment, variant

RNG_SEED = 2116


def record(variant_id: str, unit: str, **values: Any) -> ExperimentRecord:
    return ExperimentRecord(
        id=new_id("expr"),
        experiment_id="exp",
        variant_id=variant_id,
        source=values.pop("source", RecordSource.LIVE),
        unit=unit,
        **values,
    )


async def store(gateway: Gateway, records: list[ExperimentRecord]) -> None:
    async with gateway.storage.unit_of_work() as uow:
        await uow.repo(ExperimentRecord).add_many(records)
        await uow.commit()


def generated(variant_id: str, n: int, *, success: float, latency: float, score: float) -> Any:
    """n records with random outcomes; the raw arrays, for scipy."""
    rng = np.random.default_rng(RNG_SEED + len(variant_id) + n)
    ok = rng.random(n) < success
    latency_ms = rng.normal(latency, 60, n).round().clip(1).astype(int)
    tokens = rng.integers(10, 400, n)
    scores = rng.normal(score, 1.0, n)
    has_score = rng.random(n) < 0.4
    records = [
        record(
            variant_id,
            f"{variant_id}-unit-{i % (n // 3)}",
            success=bool(ok[i]),
            error=None if ok[i] else "upstream_error: failed",
            latency_ms=int(latency_ms[i]),
            first_token_ms=int(latency_ms[i] // 3),
            input_tokens=int(tokens[i]),
            output_tokens=int(tokens[i] // 2),
            cost_micros=int(tokens[i]) * 7,
            feedback_score=float(scores[i]) if has_score[i] else None,
            feedback_label=("good" if scores[i] > score else "bad") if has_score[i] else None,
        )
        for i in range(n)
    ]
    raw = {
        "success": ok,
        "latency_ms": latency_ms[ok],
        "first_token_ms": (latency_ms // 3)[ok],
        "input_tokens": tokens[ok],
        "cost_micros": tokens[ok] * 7,
        "feedback_score": scores[has_score],
        "units": len({r.unit for r in records}),
    }
    return records, raw


def by(results: dict[str, Any], variant_id: str, metric: str) -> dict[str, Any]:
    found: dict[str, Any] = next(
        c for c in results["comparisons"] if c["variant_id"] == variant_id and c["metric"] == metric
    )
    return found


async def test_results_equal_scipys_numbers_for_generated_records(gateway: Gateway) -> None:
    await gateway.running(experiment(primary_metric="latency_ms", minimum_effect=10))
    control, raw_c = generated("control", 900, success=0.9, latency=500, score=3.0)
    other, raw_o = generated("other", 600, success=0.8, latency=470, score=3.2)
    await store(gateway, control + other)

    results = await gateway.get("/admin/experiments/exp/results")

    assert results["total"] == 1500 and results["source"] == "live"
    shown = {v["variant_id"]: v for v in results["variants"]}
    for name, raw in (("control", raw_c), ("other", raw_o)):
        variant_ = shown[name]
        n, k = len(raw["success"]), int(raw["success"].sum())
        assert variant_["n"] == n and variant_["units"] == raw["units"]
        wilson = stats.binomtest(k, n).proportion_ci(method="wilson")
        assert variant_["success"]["rate"] == pytest.approx(k / n, rel=1e-12)
        assert variant_["success"]["ci_low"] == pytest.approx(wilson.low, rel=1e-9)
        assert variant_["success"]["ci_high"] == pytest.approx(wilson.high, rel=1e-9)
        latency = variant_["metrics"]["latency_ms"]
        values = raw["latency_ms"]
        assert latency["n"] == len(values)
        assert latency["mean"] == pytest.approx(values.mean(), rel=1e-12)
        assert latency["sd"] == pytest.approx(values.std(ddof=1), rel=1e-9)
        low, high = stats.t.interval(0.95, len(values) - 1, values.mean(), stats.sem(values))
        assert (latency["ci_low"], latency["ci_high"]) == (
            pytest.approx(low, rel=1e-9),
            pytest.approx(high, rel=1e-9),
        )
        assert (latency["min"], latency["max"]) == (values.min(), values.max())
        for q, key in ((0.5, "p50"), (0.95, "p95"), (0.99, "p99")):
            # A sketch's quantile: within 1 % of the value of rank floor(q (n - 1)).
            lower = np.quantile(values, q, method="lower")
            assert latency[key] == pytest.approx(lower, rel=SKETCH_ACCURACY)
        score = variant_["metrics"]["feedback_score"]
        assert score["mean"] == pytest.approx(raw["feedback_score"].mean(), rel=1e-9)
        assert sum(variant_["feedback_labels"].values()) == len(raw["feedback_score"])

    p_values = []
    rate = by(results, "other", "success_rate")
    k1, n1 = int(raw_o["success"].sum()), len(raw_o["success"])
    k2, n2 = int(raw_c["success"].sum()), len(raw_c["success"])
    pooled = (k1 + k2) / (n1 + n2)
    z = (k1 / n1 - k2 / n2) / np.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    assert rate["test"] == "two_proportion_z"
    assert rate["statistic"] == pytest.approx(z, rel=1e-9)
    assert rate["p_value"] == pytest.approx(2 * stats.norm.sf(abs(z)), rel=1e-9)
    p_values.append(rate["p_value"])
    for metric in ("latency_ms", "first_token_ms", "input_tokens", "cost_micros", "feedback_score"):
        compared = by(results, "other", metric)
        reference = stats.ttest_ind(raw_o[metric], raw_c[metric], equal_var=False)
        interval = reference.confidence_interval(0.95)
        assert compared["test"] == "welch_t"
        assert compared["statistic"] == pytest.approx(reference.statistic, rel=1e-9)
        assert compared["p_value"] == pytest.approx(reference.pvalue, rel=1e-9)
        assert compared["df"] == pytest.approx(reference.df, rel=1e-9)
        assert compared["ci_low"] == pytest.approx(interval.low, rel=1e-9)
        assert compared["ci_high"] == pytest.approx(interval.high, rel=1e-9)
        p_values.append(compared["p_value"])
    output = by(results, "other", "output_tokens")
    p_values.append(output["p_value"])
    adjusted = holm(p_values)
    made = (
        [rate]
        + [
            by(results, "other", m)
            for m in (
                "latency_ms",
                "first_token_ms",
                "input_tokens",
                "cost_micros",
                "feedback_score",
            )
        ]
        + [output]
    )
    assert [c["p_adjusted"] for c in made] == pytest.approx(adjusted, rel=1e-12)

    srm = results["sample_ratio"]
    units = [raw_c["units"], raw_o["units"]]
    reference_srm = stats.chisquare(units, [sum(units) / 2] * 2)
    assert srm["chi2"] == pytest.approx(reference_srm.statistic, rel=1e-9)
    assert srm["p_value"] == pytest.approx(reference_srm.pvalue, rel=1e-9)
    assert srm["mismatch"] is True  # 300 units against 200 where 50/50 was configured
    latency = by(results, "other", "latency_ms")
    assert latency["verdict"] == "better" and latency["difference"] < -10
    assert results["winner"] == "other"


async def test_a_split_as_allocated_passes_the_sample_ratio_check(gateway: Gateway) -> None:
    body = experiment(
        variants=[variant("control", 30, control=True), variant("other", 70, model="other")]
    )
    await gateway.running(body)
    await store(
        gateway,
        [record("control", f"c{i}") for i in range(310)]
        + [record("other", f"o{i}") for i in range(690)],
    )

    results = await gateway.get("/admin/experiments/exp/results")

    srm = results["sample_ratio"]
    assert srm["observed"] == {"control": 310, "other": 690}
    assert srm["expected"] == {"control": 300.0, "other": 700.0}
    assert srm["mismatch"] is False and srm["p_value"] > 0.001


async def test_a_significant_difference_below_the_minimum_effect_is_no_winner(
    gateway: Gateway,
) -> None:
    await gateway.running(experiment(primary_metric="latency_ms", minimum_effect=100))
    await store(
        gateway,
        [record("control", f"c{i}", latency_ms=500 + i % 7) for i in range(300)]
        + [record("other", f"o{i}", latency_ms=480 + i % 7) for i in range(300)],
    )

    results = await gateway.get("/admin/experiments/exp/results")

    assert by(results, "other", "latency_ms")["verdict"] == "better"
    assert results["winner"] is None
    assert "less than the minimum effect" in results["recommendation"]


async def test_results_without_records_and_with_identical_outcomes_test_nothing(
    gateway: Gateway,
) -> None:
    await gateway.running(experiment())
    empty = await gateway.get("/admin/experiments/exp/results")
    assert empty["total"] == 0 and empty["sample_ratio"] is None and empty["winner"] is None
    assert all(c["verdict"] == "not_tested" for c in empty["comparisons"])
    assert empty["variants"][0]["success"] == {
        "count": 0,
        "rate": None,
        "ci_low": None,
        "ci_high": None,
    }

    await store(
        gateway,
        [record(v, f"{v}{i}", latency_ms=100) for v in ("control", "other") for i in range(5)],
    )
    same = await gateway.get("/admin/experiments/exp/results")
    rate = by(same, "other", "success_rate")
    assert rate["p_value"] is None and rate["verdict"] == "not_tested" and rate["difference"] == 0
    assert same["variants"][0]["success"]["ci_high"] == 1.0
    assert by(same, "other", "latency_ms")["note"] == "no variance on either side"


async def test_results_of_a_batch_are_its_offline_records_alone(gateway: Gateway) -> None:
    await gateway.running(experiment())
    batch = new_id("op")
    await store(
        gateway,
        [record("control", f"live{i}") for i in range(4)]
        + [
            record(v, f"item{i}", source=RecordSource.OFFLINE, operation_id=batch, item_id=f"i{i}")
            for v in ("control", "other")
            for i in range(3)
        ],
    )

    offline = await gateway.get(f"/admin/experiments/exp/results?operation_id={batch}")
    live = await gateway.get("/admin/experiments/exp/results")

    assert offline["source"] == "offline" and offline["total"] == 6
    assert offline["sample_ratio"] is None  # every item ran through every variant
    assert live["total"] == 4
    refused = await gateway.get("/admin/experiments/exp/results?operation_id=nope", status=400)
    assert refused["error"]["param"] == "operation_id"

"""An experiment's results from the totals of its records (`app.experiments.totals`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from app.experiments.entities import Experiment, Metric, RecordSource
from app.experiments.schemas import (
    Comparison,
    MeanRead,
    RateRead,
    ResultsRead,
    SampleRatio,
    VariantResult,
)
from app.experiments.stats import (
    ALPHA,
    HIGHER_IS_BETTER,
    Mean,
    Rate,
    Test,
    holm,
    mcnemar,
    mean_of,
    paired_t,
    sample_ratio,
    two_proportions,
    welch,
    wilson,
)
from app.experiments.totals import OF_ALL, OF_SUCCESSES, SKETCHED, diff_column
from app.storage.protocol import Moments, Summary

QUANTILES = (0.5, 0.95, 0.99)
WITH_QUANTILES = SKETCHED
# Fewer units than this expected in a variant make the χ² approximation of the split rough.
_SRM_MIN_EXPECTED = 5
_EMPTY = Moments()
_NAMES = {
    welch: "welch_t",
    two_proportions: "two_proportion_z",
    paired_t: "paired_t",
    mcnemar: "mcnemar_exact",
}


@dataclass(frozen=True)
class Aggregates:
    """What the records of one variant sum to: all of them, and those that succeeded."""

    every: Summary | None
    successes: Summary | None
    labels: Mapping[Any, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Made:
    """One comparison made: of which variant, on which metric, by which test."""

    variant_id: str
    metric: Metric
    name: str
    test: Test
    pairs: int | None = None


def _mean(summary: Summary | None, metric: Metric) -> tuple[Mean, list[float | None]]:
    if summary is None:
        return mean_of(_EMPTY), [None] * len(QUANTILES)
    cuts = summary.quantiles.get(metric.value, [None] * len(QUANTILES))
    return mean_of(summary.moments.get(metric.value, _EMPTY)), cuts


def _differences(found: Aggregates, metric: Metric) -> Moments | None:
    """The moments of a variant's per-item differences from control on `metric`, if any."""
    if found.every is None:
        return None
    d = found.every.moments.get(diff_column(metric))
    return d if d is not None and d.n > 0 else None


def analyse(
    experiment: Experiment,
    aggregates: Mapping[str, Aggregates],
    *,
    source: RecordSource,
    operation_id: str | None,
) -> ResultsRead:
    """Per-variant figures, every variant against control, the split check, and the winner."""
    variants = experiment.variants
    control = next(v for v in variants if v.get("control"))
    rates: dict[str, Rate] = {}
    means: dict[str, dict[Metric, Mean]] = {}
    shown: list[VariantResult] = []
    units: dict[str, int] = {}
    for variant in variants:
        found = aggregates.get(variant["id"], Aggregates(None, None))
        n = found.every.count if found.every is not None else 0
        successes = found.every.moments["success"].total if found.every is not None else 0
        rates[variant["id"]] = rate = wilson(int(successes), n)
        units[variant["id"]] = found.every.distinct.get("unit", 0) if found.every else 0
        metrics: dict[str, MeanRead] = {}
        means[variant["id"]] = {}
        for metric in (*OF_SUCCESSES, *OF_ALL):
            summary = found.successes if metric in OF_SUCCESSES else found.every
            mean, cuts = _mean(summary, metric)
            means[variant["id"]][metric] = mean
            extra = {}
            if metric in WITH_QUANTILES:
                extra = dict(zip(("p50", "p95", "p99"), cuts, strict=True))
            metrics[metric.value] = MeanRead(
                n=mean.n,
                mean=mean.mean,
                sd=mean.sd,
                ci_low=mean.low,
                ci_high=mean.high,
                min=mean.least,
                max=mean.most,
                **extra,
            )
        shown.append(
            VariantResult(
                variant_id=variant["id"],
                name=variant.get("name") or variant["id"],
                control=bool(variant.get("control")),
                allocation=variant["weight"] / 100,
                n=n,
                units=units[variant["id"]],
                success=RateRead(
                    count=rate.count, rate=rate.rate, ci_low=rate.low, ci_high=rate.high
                ),
                metrics=metrics,
                feedback_labels={str(k): v for k, v in sorted(found.labels.items())},
            )
        )
    tests: list[Made] = []
    for variant in variants:
        if variant is control:
            continue
        vid, cid = variant["id"], control["id"]
        found = aggregates.get(vid, Aggregates(None, None))
        for metric in (Metric.SUCCESS_RATE, *OF_SUCCESSES, *OF_ALL):
            # A batch ran every item through every variant: where its items pair up, compare
            # on the same items (paired t, McNemar) rather than as independent samples.
            pairs = _differences(found, metric) if source is RecordSource.OFFLINE else None
            if pairs is not None:
                test = mcnemar if metric is Metric.SUCCESS_RATE else paired_t
                tests.append(Made(vid, metric, _NAMES[test], test(pairs), pairs.n))
            elif metric is Metric.SUCCESS_RATE:
                made = two_proportions(rates[vid], rates[cid])
                tests.append(Made(vid, metric, _NAMES[two_proportions], made))
            else:
                made = welch(means[vid][metric], means[cid][metric])
                tests.append(Made(vid, metric, _NAMES[welch], made))
    comparisons = _comparisons(tests, rates, means, control["id"])
    winner, recommendation = _winner(experiment, comparisons)
    return ResultsRead(
        experiment_id=experiment.id,
        status=experiment.status,
        source=source,
        operation_id=operation_id,
        primary_metric=experiment.primary_metric,
        minimum_effect=experiment.minimum_effect,
        alpha=ALPHA,
        total=sum(r.n for r in rates.values()),
        variants=shown,
        comparisons=comparisons,
        # Offline, every item runs through every variant: the split is not random.
        sample_ratio=_split(variants, units) if source is RecordSource.LIVE else None,
        winner=winner,
        recommendation=recommendation,
    )


def _comparisons(
    tests: list[Made],
    rates: Mapping[str, Rate],
    means: Mapping[str, Mapping[Metric, Mean]],
    control_id: str,
) -> list[Comparison]:
    made = [i for i, m in enumerate(tests) if m.test.p_value is not None]
    adjusted = dict(zip(made, holm([tests[i].test.p_value or 0.0 for i in made]), strict=True))
    shown = []
    for i, one in enumerate(tests):
        variant_id, metric, test = one.variant_id, one.metric, one.test
        if metric is Metric.SUCCESS_RATE:
            base = rates[control_id].rate
        else:
            base = means[control_id][metric].mean
        relative = (
            test.difference / base
            if test.difference is not None and base is not None and base != 0
            else None
        )
        p_adjusted = adjusted.get(i)
        significant = p_adjusted is not None and p_adjusted < ALPHA
        verdict = "not_tested" if p_adjusted is None else "no_difference"
        if significant and test.difference is not None:
            better = (test.difference > 0) == (metric in HIGHER_IS_BETTER)
            verdict = "better" if better else "worse"
        shown.append(
            Comparison(
                variant_id=variant_id,
                metric=metric,
                test=one.name,
                pairs=one.pairs,
                statistic=test.statistic,
                df=test.df,
                p_value=test.p_value,
                p_adjusted=p_adjusted,
                difference=test.difference,
                ci_low=test.low,
                ci_high=test.high,
                relative_difference=relative,
                significant=significant,
                verdict=verdict,
                note=test.note,
            )
        )
    return shown


def _winner(experiment: Experiment, comparisons: list[Comparison]) -> tuple[str | None, str]:
    """The variant that beats control on the primary metric, significantly after correction
    and by at least the experiment's minimum effect; the best such one if several do."""
    metric = experiment.primary_metric
    threshold = experiment.minimum_effect
    primary = [c for c in comparisons if c.metric is metric]
    winners = [
        c
        for c in primary
        if c.verdict == "better" and c.difference is not None and abs(c.difference) >= threshold
    ]
    if winners:
        best = max(winners, key=lambda c: abs(c.difference or 0.0))
        return best.variant_id, (
            f"variant '{best.variant_id}' beats control on {metric.value} by "
            f"{best.difference:+.6g} (Holm-adjusted p = {best.p_adjusted:.3g}), beyond the "
            f"minimum effect of {threshold:g}"
        )
    if any(c.verdict == "better" for c in primary):
        return None, (
            f"a variant is significantly better on {metric.value}, but by less than the "
            f"minimum effect of {threshold:g}: keep control or collect more data"
        )
    if any(c.verdict == "worse" for c in primary):
        return None, f"no variant beats control on {metric.value}; at least one is worse"
    return None, f"no significant difference on {metric.value} yet"


def _split(variants: list[dict[str, Any]], units: Mapping[str, int]) -> SampleRatio | None:
    observed = [units[v["id"]] for v in variants]
    ratio = sample_ratio(observed, [v["weight"] for v in variants])
    if ratio is None:
        return None
    rough = min(ratio.expected) < _SRM_MIN_EXPECTED
    return SampleRatio(
        chi2=ratio.chi2,
        df=ratio.df,
        p_value=ratio.p_value,
        mismatch=ratio.mismatch,
        observed={v["id"]: units[v["id"]] for v in variants},
        expected={v["id"]: e for v, e in zip(variants, ratio.expected, strict=True)},
        note="fewer than 5 units expected in a variant: the χ² test is rough" if rough else None,
    )

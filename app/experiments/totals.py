"""Experiment totals: what the records of each variant sum to, live or per batch, kept in a
few rows so results never read every record.

A roll-up claims the records (and feedback changes) of an experiment that no roll-up has
counted yet (`update_all` of their `rollup` column: concurrent roll-ups take different rows,
and the claim and the totals commit together, so a record is counted once), sums them in the
database (`summarize`, `count_by`) and adds the sums to the `ExperimentTotals` rows. Nothing on
a call's path changes: records are inserted as before, and a periodic task and each results
query roll up what has arrived since.

What the totals keep, per variant: the calls; `Moments` (count, sum, sum of squares, least,
greatest) of each metric, whose integer sums stay exact integers, so means, variances and
every test computed from them equal those computed from the raw values; the distinct units
(one `ExperimentUnit` row per unit, so the count is exact across roll-ups); feedback label
tallies; and for latency and time to first token a DDSketch (relative accuracy 1 %): a
quantile read from it is within 1 % of the value of rank ⌊q·(n - 1)⌋ among the n values (the
"lower" quantile), whatever n is.

Feedback given to a record already counted becomes an `ExperimentFeedbackChange` (the new score
and label in, the old ones out), rolled up the same way; the least and greatest score are read
from the records themselves (an index gives each in one lookup), since a replaced score cannot
be taken out of a minimum.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ddsketch import DDSketch
from ddsketch.mapping import LogarithmicMapping

from app.core.errors import DuplicateKey, StaleVersion
from app.core.ids import new_id
from app.experiments.entities import (
    ExperimentFeedbackChange,
    ExperimentRecord,
    ExperimentTotals,
    ExperimentUnit,
    Metric,
    RecordSource,
)
from app.storage.protocol import Moments, Storage, Summary, UnitOfWork, Where

# Latency, tokens and cost are of the calls that succeeded (a failure's are not comparable);
# feedback is of every call that got some.
OF_SUCCESSES = (
    Metric.LATENCY_MS,
    Metric.FIRST_TOKEN_MS,
    Metric.INPUT_TOKENS,
    Metric.OUTPUT_TOKENS,
    Metric.COST_MICROS,
)
OF_ALL = (Metric.FEEDBACK_SCORE,)
SKETCHED = (Metric.LATENCY_MS, Metric.FIRST_TOKEN_MS)
# The metrics an offline record holds its difference from control's for (`<metric>_diff`).
PAIRED = (Metric.SUCCESS_RATE, *OF_SUCCESSES)
SKETCH_ACCURACY = 0.01
# Records (and feedback changes) one roll-up transaction claims at most: each is updated once
# (its `rollup`), well under a second a chunk.
CHUNK = 5_000
_ATTEMPTS = 5
_ZERO = "zero"  # the sketch bin of values too small for a logarithm (0 ms)
_MAPPING = LogarithmicMapping(SKETCH_ACCURACY)
_SUCCESS = "success"
_FEEDBACK = Metric.FEEDBACK_SCORE.value
_LABEL = "feedback_label"


def diff_column(metric: Metric) -> str:
    """The record column holding a variant's difference from control on `metric`."""
    return "success_diff" if metric is Metric.SUCCESS_RATE else f"{metric.value}_diff"


def _digest(*parts: str | None) -> str:
    joined = "\x1f".join(p if p is not None else "\x00" for p in parts)
    return hashlib.blake2b(joined.encode(), digest_size=16).hexdigest()


def totals_id(
    experiment_id: str, source: RecordSource, operation_id: str | None, variant_id: str
) -> str:
    """The key of one variant's totals, live (`operation_id` None) or of one batch."""
    return _digest(experiment_id, source.value, operation_id, variant_id)


def unit_id(totals: str, unit: str) -> str:
    return _digest(totals, unit)


# ---- moments and sketches ------------------------------------------------------------------


def merged(a: Moments, b: Moments) -> Moments:
    """The moments of the values of `a` and of `b` together."""
    if a.n == 0:
        return b
    if b.n == 0:
        return a
    least = [v for v in (a.least, b.least) if v is not None]
    most = [v for v in (a.most, b.most) if v is not None]
    return Moments(
        a.n + b.n,
        a.total + b.total,
        a.squares + b.squares,
        min(least) if least else None,
        max(most) if most else None,
    )


def _number(value: Any) -> int | float:
    return int(value) if isinstance(value, str) else value


def encode_moments(m: Moments) -> list[Any]:
    """JSON for `m`: integer sums as decimal strings (they can pass 64 bits)."""

    def exact(v: int | float) -> Any:
        return str(v) if isinstance(v, int) else v

    return [m.n, exact(m.total), exact(m.squares), m.least, m.most]


def decode_moments(value: Sequence[Any] | None) -> Moments:
    if not value:
        return Moments()
    n, total, squares, least, most = value
    return Moments(int(n), _number(total), _number(squares), least, most)


def sketch_bins(values: Mapping[Any, int]) -> Counter[str]:
    """The sketch bins of exact values (value → how many)."""
    bins: Counter[str] = Counter()
    for value, count in values.items():
        if value is None:
            continue
        key = str(_MAPPING.key(value)) if value > _MAPPING.min_possible else _ZERO
        bins[key] += count
    return bins


def sketch_quantiles(bins: Mapping[str, int], fractions: Iterable[float]) -> list[float | None]:
    """The quantiles of the values in `bins`, each within `SKETCH_ACCURACY` of the value of
    rank ⌊q·(n - 1)⌋; Nones when empty."""
    sketch = DDSketch(SKETCH_ACCURACY)
    for key, count in bins.items():
        if count > 0:
            sketch.add(0.0 if key == _ZERO else _MAPPING.value(int(key)), float(count))
    cuts: list[float | None] = []
    for q in fractions:
        value = sketch.get_quantile_value(q) if sketch.count else None
        cuts.append(None if value is None else float(value))
    return cuts


# ---- sums of a set of records --------------------------------------------------------------


@dataclass
class Sums:
    """What some records of one variant add to its totals."""

    calls: int = 0
    moments: dict[str, Moments] = field(default_factory=dict)
    bins: dict[str, Counter[str]] = field(default_factory=dict)
    labels: Counter[str] = field(default_factory=Counter)
    units: set[str] = field(default_factory=set)

    def add_moments(self, name: str, more: Moments) -> None:
        self.moments[name] = merged(self.moments.get(name, Moments()), more)


Group = tuple[RecordSource, str | None, str]  # source, batch (offline), variant


async def _selections(
    repo: Any, claimed: Where
) -> list[tuple[RecordSource, str | None, list[Where]]]:
    """The live records and each batch's among those claimed, with their conditions."""
    found: list[tuple[RecordSource, str | None, list[Where]]] = []
    sources = await repo.count_by("source", claimed)
    if RecordSource.LIVE in sources:
        found.append((RecordSource.LIVE, None, [claimed, Where.eq("source", RecordSource.LIVE)]))
    if RecordSource.OFFLINE in sources:
        offline = Where.eq("source", RecordSource.OFFLINE)
        for batch in await repo.count_by("operation_id", claimed, offline):
            found.append(
                (RecordSource.OFFLINE, batch, [claimed, offline, Where.eq("operation_id", batch)])
            )
    return found


async def record_sums(uow: UnitOfWork, claimed: Where) -> dict[Group, Sums]:
    """The sums of the records matching `claimed`, per source, batch and variant."""
    repo = uow.repo(ExperimentRecord)
    sums: dict[Group, Sums] = {}
    every_columns = [_SUCCESS, _FEEDBACK, *(diff_column(m) for m in PAIRED)]
    for source, batch, where in await _selections(repo, claimed):
        every = await repo.summarize("variant_id", every_columns, *where)
        ok = Where.eq("success", True)
        successes = await repo.summarize("variant_id", [m.value for m in OF_SUCCESSES], *where, ok)
        for variant_id, summary in every.items():
            group = sums[(source, batch, variant_id)] = Sums(calls=summary.count)
            for name, moments in summary.moments.items():
                if moments.n:
                    group.add_moments(name, moments)
            succeeded = successes.get(variant_id)
            for name, moments in (succeeded.moments if succeeded else {}).items():
                if moments.n:
                    group.add_moments(name, moments)
            mine = [*where, Where.eq("variant_id", variant_id)]
            for metric in SKETCHED if succeeded else ():
                values = await repo.count_by(metric.value, *mine, ok)
                group.bins[metric.value] = sketch_bins({k: t.count for k, t in values.items()})
            labels = await repo.count_by(_LABEL, *mine, Where.is_null(_LABEL, False))
            group.labels.update({k: t.count for k, t in labels.items()})
            units = await repo.count_by("unit", *mine, Where.is_null("unit", False))
            group.units.update(units)
    return sums


async def change_sums(uow: UnitOfWork, claimed: Where) -> dict[Group, Sums]:
    """What the feedback changes matching `claimed` add, per source, batch and variant."""
    repo = uow.repo(ExperimentFeedbackChange)
    sums: dict[Group, Sums] = {}
    for source, batch, where in await _selections(repo, claimed):
        found = await repo.summarize("variant_id", ["scored", "score", "score_squares"], *where)
        for variant_id, summary in found.items():
            group = sums[(source, batch, variant_id)] = Sums()
            m = summary.moments
            group.moments[_FEEDBACK] = Moments(
                int(m["scored"].total), m["score"].total, m["score_squares"].total
            )
            mine = [*where, Where.eq("variant_id", variant_id)]
            added = await repo.count_by("label_added", *mine, Where.is_null("label_added", False))
            removed = await repo.count_by(
                "label_removed", *mine, Where.is_null("label_removed", False)
            )
            group.labels.update({k: t.count for k, t in added.items()})
            group.labels.subtract({k: t.count for k, t in removed.items()})
    return sums


def _fold(totals: ExperimentTotals, sums: Sums, new_units: int) -> None:
    totals.calls += sums.calls
    totals.units += new_units
    moments = dict(totals.moments)
    for name, more in sums.moments.items():
        moments[name] = encode_moments(merged(decode_moments(moments.get(name)), more))
    totals.moments = moments
    sketches = {k: dict(v) for k, v in totals.sketches.items()}
    for name, bins in sums.bins.items():
        current = Counter({k: int(v) for k, v in sketches.get(name, {}).items()})
        current.update(bins)
        sketches[name] = dict(current)
    totals.sketches = sketches
    labels = Counter({k: int(v) for k, v in totals.labels.items()})
    labels.update(sums.labels)
    totals.labels = {k: v for k, v in labels.items() if v}


# ---- the roll-up ---------------------------------------------------------------------------


class Totals:
    """Rolls up the records of experiments into their totals, and reads the totals."""

    def __init__(self, storage: Storage, *, chunk: int = CHUNK) -> None:
        self._storage = storage
        self._chunk = chunk

    async def roll_up(self, experiment_id: str) -> int:
        """Count every record and feedback change of the experiment not yet counted; how
        many were."""
        counted = 0
        while True:
            claimed = await self._roll_up_chunk(experiment_id)
            counted += claimed
            if claimed < self._chunk:
                return counted

    async def roll_up_all(self) -> int:
        """`roll_up` every experiment with something to count (the periodic task)."""
        waiting = Where.is_null("rollup")
        async with self._storage.unit_of_work() as uow:
            pending = set(await uow.repo(ExperimentRecord).count_by("experiment_id", waiting))
            pending |= set(
                await uow.repo(ExperimentFeedbackChange).count_by("experiment_id", waiting)
            )
        counted = 0
        for experiment_id in sorted(pending):
            counted += await self.roll_up(experiment_id)
        return counted

    async def _roll_up_chunk(self, experiment_id: str) -> int:
        for attempt in range(_ATTEMPTS):
            try:
                return await self._claim_and_count(experiment_id)
            except (StaleVersion, DuplicateKey):
                # Another roll-up wrote the same totals (or units) first: claim again.
                if attempt == _ATTEMPTS - 1:
                    raise
        return 0  # pragma: no cover

    async def _claim_and_count(self, experiment_id: str) -> int:
        token = new_id("rollup")
        waiting = [Where.eq("experiment_id", experiment_id), Where.is_null("rollup")]
        claimed = Where.eq("rollup", token)
        async with self._storage.unit_of_work() as uow:
            records = await uow.repo(ExperimentRecord).update_all(
                {"rollup": token}, *waiting, limit=self._chunk
            )
            changes = await uow.repo(ExperimentFeedbackChange).update_all(
                {"rollup": token}, *waiting, limit=self._chunk
            )
            if not records and not changes:
                return 0
            groups: dict[Group, list[Sums]] = {}
            if records:
                for group, sums in (await record_sums(uow, claimed)).items():
                    groups.setdefault(group, []).append(sums)
            if changes:
                for group, sums in (await change_sums(uow, claimed)).items():
                    groups.setdefault(group, []).append(sums)
            await self._add(uow, experiment_id, groups)
            await uow.commit()
        return max(records, changes)

    async def _add(
        self, uow: UnitOfWork, experiment_id: str, groups: Mapping[Group, list[Sums]]
    ) -> None:
        repo = uow.repo(ExperimentTotals)
        keys = {g: totals_id(experiment_id, *g) for g in groups}
        existing = {t.id: t for t in await repo.get_many(list(keys.values()))}
        for group, parts in groups.items():
            key = keys[group]
            units: set[str] = set().union(*(p.units for p in parts))
            new_units = 0
            if units:
                added = await uow.repo(ExperimentUnit).add_missing(
                    [
                        ExperimentUnit(
                            id=unit_id(key, u), experiment_id=experiment_id, totals_id=key
                        )
                        for u in sorted(units)
                    ]
                )
                new_units = len(added)
            totals = existing.get(key)
            fresh = totals is None
            if totals is None:
                source, batch, variant_id = group
                totals = ExperimentTotals(
                    id=key,
                    experiment_id=experiment_id,
                    variant_id=variant_id,
                    source=source,
                    operation_id=batch,
                )
            for i, sums in enumerate(parts):
                _fold(totals, sums, new_units if i == 0 else 0)
            if fresh:
                await repo.add(totals)
            else:
                await repo.update(totals)

    # ---- reading -------------------------------------------------------------------------

    async def read(
        self,
        experiment_id: str,
        *,
        source: RecordSource,
        operation_id: str | None,
        fractions: Sequence[float],
    ) -> dict[str, tuple[Summary, Summary, dict[str, int]]]:
        """Per variant: the summary of all its counted calls (success, feedback, paired
        differences, units), that of its successful ones (with sketch quantiles), and its
        feedback labels."""
        where = [Where.eq("experiment_id", experiment_id), Where.eq("source", source)]
        where.append(
            Where.eq("operation_id", operation_id)
            if operation_id is not None
            else Where.is_null("operation_id")
        )
        async with self._storage.unit_of_work() as uow:
            rows = (await uow.repo(ExperimentTotals).find(*where)).items
            found = {}
            for totals in rows:
                moments = {k: decode_moments(v) for k, v in totals.moments.items()}
                feedback = moments.get(_FEEDBACK, Moments())
                if feedback.n:
                    least, most = await self._score_extremes(uow, totals)
                    moments[_FEEDBACK] = Moments(
                        feedback.n, feedback.total, feedback.squares, least, most
                    )
                success = moments.get(_SUCCESS, Moments())
                every_names = [_SUCCESS, _FEEDBACK, *(diff_column(m) for m in PAIRED)]
                every = Summary(
                    count=totals.calls,
                    moments={k: moments[k] for k in every_names if k in moments},
                    distinct={"unit": totals.units},
                )
                successes = Summary(
                    count=int(success.total),
                    moments={m.value: moments[m.value] for m in OF_SUCCESSES if m.value in moments},
                    quantiles={
                        m.value: sketch_quantiles(totals.sketches.get(m.value, {}), fractions)
                        for m in SKETCHED
                    },
                )
                labels = {k: int(v) for k, v in totals.labels.items()}
                found[totals.variant_id] = (every, successes, labels)
        return found

    async def _score_extremes(
        self, uow: UnitOfWork, totals: ExperimentTotals
    ) -> tuple[float | None, float | None]:
        where = [
            Where.eq("experiment_id", totals.experiment_id),
            Where.eq("variant_id", totals.variant_id),
            Where.is_null(_FEEDBACK, False),
            Where.eq("source", totals.source),
        ]
        if totals.operation_id is not None:
            where.append(Where.eq("operation_id", totals.operation_id))
        repo = uow.repo(ExperimentRecord)
        least = (await repo.find(*where, order_by=[_FEEDBACK], limit=1)).items
        most = (await repo.find(*where, order_by=[f"-{_FEEDBACK}"], limit=1)).items
        return (
            least[0].feedback_score if least else None,
            most[0].feedback_score if most else None,
        )


def change_of(
    record: ExperimentRecord, score: float | None, label: str | None
) -> ExperimentFeedbackChange | None:
    """What replacing a counted record's feedback by `score` and `label` changes in its
    totals; None when nothing does."""
    old_score, old_label = record.feedback_score, record.feedback_label
    new_score = old_score if score is None else score
    new_label = old_label if label is None else label
    if new_score == old_score and new_label == old_label:
        return None
    scored = int(new_score is not None) - int(old_score is not None)
    return ExperimentFeedbackChange(
        id=new_id("expf"),
        experiment_id=record.experiment_id,
        record_id=record.id,
        variant_id=record.variant_id,
        source=record.source,
        operation_id=record.operation_id if record.source == RecordSource.OFFLINE else None,
        scored=scored,
        score=(new_score or 0.0) - (old_score or 0.0),
        score_squares=(new_score or 0.0) ** 2 - (old_score or 0.0) ** 2,
        label_added=new_label if new_label != old_label else None,
        label_removed=old_label if new_label != old_label else None,
    )

"""Experiment totals: what the records of each variant sum to, live or per batch, kept in a
few rows so results never read every record.

Every record (and feedback change) carries a commit stamp (`commit_stamp()`: the inserting
transaction's id on PostgreSQL), and each experiment an `ExperimentWatermark`: its totals count
exactly the rows stamped below it. A roll-up reads the commit horizon (no row can appear below
it any more), sums in the database (`summarize`, `count_by`) the rows stamped in [watermark,
horizon) — at most a chunk of records, ending between two stamps — adds the sums to the
`ExperimentTotals` rows and moves the watermark, version-checked, in the same transaction: two
roll-ups cannot both count a range (the second one starts over). Records are only read, never
written, by a roll-up, and nothing on a call's path changes. Results are the totals plus the
same sums over the rows at or above the watermark (few, since a periodic task rolls up), so a
results query writes nothing.

What the totals keep, per variant: the calls; `Moments` (count, sum, sum of squares, least,
greatest) of each metric, whose integer sums stay exact integers, so means, variances and
every test computed from them equal those computed from the raw values; the distinct units
(one `ExperimentUnit` row per unit, so the count is exact across roll-ups); feedback label
tallies; and for latency and time to first token a DDSketch (relative accuracy 1 %): a
quantile read from it is within 1 % of the value of rank ⌊q·(n - 1)⌋ among the n values (the
"lower" quantile), whatever n is.

Feedback given to a record already counted (stamped below the watermark) becomes an
`ExperimentFeedbackChange` (the new score and label in, the old ones out), stamped and rolled
up with the records by the same watermark; feedback to a record not yet counted is written on
it, and steps the watermark's version so that a roll-up counting the record meanwhile starts
over; the least and greatest score are read
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
    Experiment,
    ExperimentFeedbackChange,
    ExperimentRecord,
    ExperimentTotals,
    ExperimentUnit,
    ExperimentWatermark,
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
# Records one roll-up transaction counts at most (all of a transaction's, should it have more):
# they are only read, a few seconds' work a chunk.
CHUNK = 50_000
STAMP = "commit_stamp"
_ATTEMPTS = 5
_PAGE = 500
_UNITS_READ = 10_000  # unit keys looked up a query
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


async def watermark(uow: UnitOfWork, experiment_id: str) -> tuple[ExperimentWatermark, bool]:
    """The experiment's watermark (0 before its first roll-up), and whether it is stored."""
    found = await uow.repo(ExperimentWatermark).get(experiment_id)
    if found is not None:
        return found, True
    return ExperimentWatermark(id=experiment_id, watermark=0), False


async def save_watermark(uow: UnitOfWork, mark: ExperimentWatermark, stored: bool) -> None:
    """Write `mark`, version-checked: `StaleVersion` (or `DuplicateKey`, for the first one)
    when another unit wrote it since it was read."""
    repo = uow.repo(ExperimentWatermark)
    if stored:
        await repo.update(mark)
    else:
        await repo.add(mark)


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
    repo: Any, span: Sequence[Where]
) -> list[tuple[RecordSource, str | None, list[Where]]]:
    """The live records and each batch's among those matching `span`, with their conditions."""
    found: list[tuple[RecordSource, str | None, list[Where]]] = []
    sources = await repo.count_by("source", *span)
    if RecordSource.LIVE in sources:
        found.append((RecordSource.LIVE, None, [*span, Where.eq("source", RecordSource.LIVE)]))
    if RecordSource.OFFLINE in sources:
        offline = Where.eq("source", RecordSource.OFFLINE)
        for batch in await repo.count_by("operation_id", *span, offline):
            found.append(
                (RecordSource.OFFLINE, batch, [*span, offline, Where.eq("operation_id", batch)])
            )
    return found


async def record_sums(uow: UnitOfWork, span: Sequence[Where]) -> dict[Group, Sums]:
    """The sums of the records matching `span`, per source, batch and variant."""
    repo = uow.repo(ExperimentRecord)
    sums: dict[Group, Sums] = {}
    every_columns = [_SUCCESS, _FEEDBACK, *(diff_column(m) for m in PAIRED)]
    for source, batch, where in await _selections(repo, span):
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


async def change_sums(uow: UnitOfWork, span: Sequence[Where]) -> dict[Group, Sums]:
    """What the feedback changes matching `span` add, per source, batch and variant."""
    repo = uow.repo(ExperimentFeedbackChange)
    sums: dict[Group, Sums] = {}
    for source, batch, where in await _selections(repo, span):
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
        """Count every record and feedback change of the experiment committed before now and
        not yet counted; how many were."""
        counted = 0
        while True:
            found, more = await self._roll_up_range(experiment_id)
            counted += found
            if not more:
                return counted

    async def roll_up_all(self) -> int:
        """`roll_up` every experiment (the periodic task): one index lookup each when nothing
        arrived."""
        counted = 0
        after: str | None = None
        while True:
            async with self._storage.unit_of_work() as uow:
                page = await uow.repo(Experiment).find(order_by=["id"], limit=_PAGE, after=after)
            for experiment in page.items:
                counted += await self.roll_up(experiment.id)
            if page.next_cursor is None:
                return counted
            after = page.next_cursor

    async def _roll_up_range(self, experiment_id: str) -> tuple[int, bool]:
        for attempt in range(_ATTEMPTS):
            try:
                return await self._count_range(experiment_id)
            except (StaleVersion, DuplicateKey):
                # Another roll-up moved the watermark (or wrote the same units) first, or
                # feedback changed a record of the range: count again from the new one.
                if attempt == _ATTEMPTS - 1:
                    raise
        return 0, False  # pragma: no cover

    async def _count_range(self, experiment_id: str) -> tuple[int, bool]:
        """Count the records and changes stamped in [watermark, end) and move the watermark
        to `end`: the horizon, or an earlier stamp when more than a chunk of records lies
        below it; how many were counted, and whether some are left below the horizon."""
        async with self._storage.unit_of_work() as uow:
            mark, stored = await watermark(uow, experiment_id)
            horizon = await uow.commit_horizon()
            if horizon <= mark.watermark:
                return 0, False
            mine = Where.eq("experiment_id", experiment_id)
            stamps = await uow.repo(ExperimentRecord).count_by(
                STAMP, mine, Where.ge(STAMP, mark.watermark), Where.lt(STAMP, horizon)
            )
            # A transaction's records share a stamp: a range ends between two stamps.
            end, more, records = horizon, False, 0
            for stamp in sorted(stamps):
                if records >= self._chunk:
                    end, more = stamp, True
                    break
                records += stamps[stamp].count
            span = [mine, Where.ge(STAMP, mark.watermark), Where.lt(STAMP, end)]
            changes = await uow.repo(ExperimentFeedbackChange).count(*span)
            if not records and not changes:
                return 0, False  # nothing to count: the watermark need not move
            groups: dict[Group, list[Sums]] = {}
            if records:
                for group, sums in (await record_sums(uow, span)).items():
                    groups.setdefault(group, []).append(sums)
            if changes:
                for group, sums in (await change_sums(uow, span)).items():
                    groups.setdefault(group, []).append(sums)
            await self._add(uow, experiment_id, groups)
            mark.watermark = end
            await save_watermark(uow, mark, stored)
            await uow.commit()
        return records + changes, more

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
        # Live records may name the job that made the call: only a batch's are told apart by it.
        tail = where[:2] if operation_id is None else where
        async with self._storage.unit_of_work() as uow:
            rows = await self._with_tail(uow, experiment_id, where, tail)
            found = {}
            for totals in rows.values():
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

    async def _with_tail(
        self,
        uow: UnitOfWork,
        experiment_id: str,
        where: Sequence[Where],
        records: Sequence[Where],
    ) -> dict[str, ExperimentTotals]:
        """The totals rows matching `where` plus what the records (and changes) matching
        `records` not yet rolled up (stamped at or above the watermark) add to them, nothing
        written.

        The watermark is read before and after: a roll-up (or feedback changing a record not
        yet counted) that commits meanwhile steps its version, and the read starts again, so
        the totals and the rest are of the same watermark."""
        for _ in range(_ATTEMPTS):
            mark, _stored = await watermark(uow, experiment_id)
            rows = {t.id: t for t in (await uow.repo(ExperimentTotals).find(*where)).items}
            tail = [*records, Where.ge(STAMP, mark.watermark)]
            groups: dict[Group, list[Sums]] = {}
            for group, sums in (await record_sums(uow, tail)).items():
                groups.setdefault(group, []).append(sums)
            for group, sums in (await change_sums(uow, tail)).items():
                groups.setdefault(group, []).append(sums)
            again, _ = await watermark(uow, experiment_id)
            if again.version == mark.version:
                break
        else:
            raise StaleVersion("ExperimentWatermark", experiment_id, mark.version)
        for group, parts in groups.items():
            key = totals_id(experiment_id, *group)
            totals = rows.get(key)
            if totals is None:
                source, batch, variant_id = group
                totals = rows[key] = ExperimentTotals(
                    id=key,
                    experiment_id=experiment_id,
                    variant_id=variant_id,
                    source=source,
                    operation_id=batch,
                )
            units: set[str] = set().union(*(p.units for p in parts))
            keys = [unit_id(key, u) for u in sorted(units)]
            counted = 0
            for at in range(0, len(keys), _UNITS_READ):
                part = keys[at : at + _UNITS_READ]
                counted += await uow.repo(ExperimentUnit).count(Where.in_("id", part))
            for i, sums in enumerate(parts):
                _fold(totals, sums, len(units) - counted if i == 0 else 0)
        return rows

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

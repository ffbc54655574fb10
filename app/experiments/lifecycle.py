"""The one table of legal status changes for experiments, and what each status lets change."""

from __future__ import annotations

from dataclasses import dataclass

from app.core.errors import IllegalTransition
from app.experiments.entities import Experiment, ExperimentStatus

D, R, P, C = (
    ExperimentStatus.DRAFT,
    ExperimentStatus.RUNNING,
    ExperimentStatus.PAUSED,
    ExperimentStatus.COMPLETED,
)

TRANSITIONS: dict[ExperimentStatus, frozenset[ExperimentStatus]] = {
    D: frozenset({R}),  # started
    R: frozenset({P, C}),  # paused; completed
    P: frozenset({R, C}),  # resumed; completed
    C: frozenset(),
}

# What an update may change in each status. Once traffic was assigned, the variants, their
# allocation, the unit, the salt and the target define what the records measure, and the
# metric and threshold were chosen before looking: changing any of them would bias results.
EDITABLE: dict[ExperimentStatus, frozenset[str]] = {
    D: frozenset(
        {
            "name",
            "description",
            "target_kind",
            "target",
            "unit",
            "salt",
            "variants",
            "primary_metric",
            "minimum_effect",
        }
    ),
    R: frozenset({"name", "description"}),
    P: frozenset({"name", "description"}),
    C: frozenset({"name", "description"}),
}

# Deleting a running experiment would drop the records of calls still being made.
DELETABLE = frozenset({D, P, C})


@dataclass(frozen=True, slots=True)
class Move:
    """A named status change and the statuses it starts from (start and resume both end in
    running, from a draft and from paused alone)."""

    name: str
    sources: frozenset[ExperimentStatus]
    target: ExperimentStatus

    def __post_init__(self) -> None:
        for source in self.sources:
            if self.target not in TRANSITIONS[source]:
                raise ValueError(f"{self.name}: {source.value} → {self.target.value} is not legal")


START = Move("start", frozenset({D}), R)
PAUSE = Move("pause", frozenset({R}), P)
RESUME = Move("resume", frozenset({P}), R)
COMPLETE = Move("complete", frozenset({R, P}), C)


def move(experiment: Experiment, step: Move) -> Experiment:
    """Take `step`, or raise `IllegalTransition` if the experiment is not where it starts."""
    current = ExperimentStatus(experiment.status)
    if current not in step.sources:
        raise IllegalTransition(
            f"experiment '{experiment.id}' is {current.value}: it cannot {step.name} "
            f"(to {step.target.value})",
            param="status",
        )
    experiment.status = step.target
    return experiment

"""The one table of legal status changes for experiments, and what each status lets change."""

from __future__ import annotations

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


def move(experiment: Experiment, to: ExperimentStatus) -> Experiment:
    """Set `experiment.status` to `to`, or raise `IllegalTransition` if the table forbids it."""
    current = ExperimentStatus(experiment.status)
    if to not in TRANSITIONS[current]:
        raise IllegalTransition(
            f"experiment '{experiment.id}' cannot go from {current.value} to {to.value}",
            param="status",
        )
    experiment.status = to
    return experiment

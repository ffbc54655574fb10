"""What a step executor is given and gives back."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from app.core.errors import Unavailable
from app.core.outbound import OutboundClient
from app.credentials.service import CredentialService
from app.gateway.calls import CallContext, Caller, GatewayCalls, Spent
from app.storage.protocol import Storage
from app.workflows.definition import Step
from app.workflows.knowledge import KnowledgeSearch
from app.workflows.references import Scope


@dataclass(frozen=True)
class StepDeps:
    """The services steps call: the one gateway call path, the guarded HTTP client, the
    credentials of external APIs, storage (external APIs), and knowledge bases if wired."""

    calls: GatewayCalls
    outbound: OutboundClient
    credentials: CredentialService
    storage: Storage
    knowledge: KnowledgeSearch | None = None


@dataclass
class StepResult:
    """A step's output, what it was run with (`input`, recorded with it; never a secret), and
    what its LLM calls used."""

    output: Any
    input: Any = None
    spent: Spent = field(default_factory=Spent)


@dataclass(frozen=True)
class Ended:
    """How a sequence of steps ended: its last output, and whether `end_workflow` ended it."""

    output: Any
    ended: bool = False


# Runs nested steps as the engine runs the workflow's own: (steps, their scope, path prefix).
NestedRun = Callable[[list[Step], Scope, str], Awaitable[Ended]]


@dataclass
class StepEnv:
    """One step being run: for whom, in which job, what its references see, and how to run a
    nested sequence of steps (branches, map items) as the engine does."""

    deps: StepDeps
    caller: Caller
    context: CallContext
    scope: Scope
    path: str
    sequence: NestedRun

    def resolve(self, value: Any) -> Any:
        return self.scope.resolve(value)


class Executor(Protocol):
    async def __call__(self, step: Any, env: StepEnv) -> StepResult: ...


def knowledge_of(env: StepEnv) -> KnowledgeSearch:
    """The knowledge bases the process was built with, or `Unavailable` saying there are none."""
    if env.deps.knowledge is None:
        raise Unavailable("knowledge bases are not available")
    return env.deps.knowledge


async def run_all(runs: list[Awaitable[Ended]]) -> list[Ended]:
    """Every nested run's end, in order; the first failure cancels the others and is raised."""
    tasks = [asyncio.ensure_future(run) for run in runs]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise

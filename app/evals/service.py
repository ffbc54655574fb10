"""Test cases, suites and runs: what is saved is checked to be runnable, and a run is jobs.

A case or suite is refused when saved if it could not run: an unknown assertion type, a
pattern that does not compile, a JSON Schema that is not one, a model, chain, prompt version or
workflow that does not exist (a 4xx naming the field, e.g. `assertions.1.value`). A run is
planned when it is started (each case's target decided, its judge and embedding models found)
and kept as a snapshot beside its `test_case_run` job, a parent with a child job per planned
case, all committed in one transaction (`app.evals.execution` runs them).
"""

from __future__ import annotations

import builtins
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter

from app.core.clock import utcnow
from app.core.errors import Conflict, DuplicateKey, InvalidInput, NotFound, StaleVersion
from app.core.ids import check_prefixed, new_id
from app.evals.assertions import parse_all
from app.evals.entities import (
    CaseOutcome,
    RunStatus,
    TestCase,
    TestCaseResult,
    TestRun,
    TestSuite,
    TestSuiteCase,
    TestType,
)
from app.evals.execution import Tally, WorkflowRunner
from app.evals.schemas import (
    AssertionSpec,
    CaseRunCreate,
    ModelPromptInput,
    PromptTarget,
    RunCreate,
    Target,
    TestCaseCreate,
    TestCaseUpdate,
    TestSuiteCreate,
    TestSuiteUpdate,
    WorkflowInput,
    WorkflowTarget,
)
from app.models.entities import Model, ModelKind
from app.models.service import ModelService
from app.operations.entities import Operation, OperationStatus
from app.operations.service import ChildSpec, OperationService, cancel_in
from app.operations.submit import Owner
from app.operations.transitions import TERMINAL
from app.prompts.service import PromptService
from app.queue.names import OperationKind
from app.storage.protocol import Page, Storage, UnitOfWork, Where, given
from app.storage.reads import delete_existing, get_existing, read_existing, read_page

log = logging.getLogger(__name__)

RUN_ID_PREFIX = "run"
_PAGE = 1000


def check_run_id(value: str, *, param: str = "run_id") -> str:
    return check_prefixed("test run", RUN_ID_PREFIX, value, param=param)


@dataclass(frozen=True)
class SuiteView:
    """A suite and its cases, in order."""

    suite: TestSuite
    case_ids: list[str]


@dataclass(frozen=True)
class RunView:
    """A run as it stands: its status (its job's, when the job ended without completing it),
    its counts, and once completed its verdict."""

    run: TestRun
    status: RunStatus
    progress: dict[str, int]
    passed: bool | None
    pass_rate: float | None
    score: float | None


@dataclass(frozen=True)
class CaseChange:
    test_case_id: str
    name: str
    baseline: TestCaseResult
    current: TestCaseResult


@dataclass(frozen=True)
class Comparison:
    run: TestRun
    baseline: TestRun
    regressions: list[CaseChange]
    improvements: list[CaseChange]
    unchanged: int
    only_in_run: list[str]
    only_in_baseline: list[str]


def run_owner(key_id: str | None, team_id: str | None) -> Owner:
    """The owner of a run an administrator starts: their key (its limits and budgets apply
    when the job calls models), or their team for a signed-in administrator."""
    return Owner(key_id=key_id, team_id=team_id, admin=True)


class EvalService:
    """Create and change test cases and suites; start, read, compare and cancel runs."""

    def __init__(
        self,
        storage: Storage,
        operations: OperationService,
        models: ModelService,
        prompts: PromptService,
        *,
        workflows: WorkflowRunner | None = None,
    ) -> None:
        self._storage = storage
        self._operations = operations
        self._models = models
        self._prompts = prompts
        self._workflows = workflows

    # ---- test cases ------------------------------------------------------------------------

    async def create_case(self, data: TestCaseCreate) -> TestCase:
        """Store a test case that could run (its references exist, its assertions are sound)."""
        await self._check_case(data.input, data.target, data.assertions)
        case = TestCase(
            id=data.id,
            name=data.name or data.id,
            description=data.description,
            test_type=TestType(data.input.type),
            input=data.input.model_dump(exclude_none=True),
            target=_dump(data.target),
            assertions=[a.stored() for a in data.assertions],
            threshold=data.threshold,
            tags=data.tags,
            enabled=data.enabled,
        )
        try:
            async with self._storage.unit_of_work() as uow:
                await uow.repo(TestCase).add(case)
                await uow.commit()
        except DuplicateKey as exc:
            raise Conflict(f"test case '{data.id}' already exists", param="id") from exc
        log.info("test case %s created", case.id)
        return case

    async def get_case(self, case_id: str) -> TestCase:
        """The test case `case_id`, or `NotFound`."""
        return await read_existing(self._storage, TestCase, case_id, "test case")

    async def list_cases(
        self,
        *,
        test_type: TestType | None = None,
        enabled: bool | None = None,
        limit: int = 20,
        after: str | None = None,
    ) -> Page[TestCase]:
        """Test cases ordered by id, a page at a time."""
        where = given(Where.eq("test_type", test_type), Where.eq("enabled", enabled))
        return await read_page(
            self._storage, TestCase, *where, order_by=["id"], limit=limit, after=after
        )

    async def update_case(self, case_id: str, changes: TestCaseUpdate) -> TestCase:
        """Apply the changes; the case as changed must still be able to run."""
        given_fields = changes.model_fields_set
        async with self._storage.unit_of_work() as uow:
            case = await get_existing(uow.repo(TestCase), case_id, "test case")
            case_input = changes.input if "input" in given_fields else _input_of(case.input)
            target = changes.target if "target" in given_fields else _target_of(case.target)
            assertions = (
                changes.assertions
                if changes.assertions is not None
                else [AssertionSpec.model_validate(a) for a in case.assertions]
            )
            assert case_input is not None
            await self._check_case(case_input, target, assertions)
            for name in ("name", "description", "threshold", "tags", "enabled"):
                if name in given_fields:
                    setattr(case, name, getattr(changes, name))
            case.input = case_input.model_dump(exclude_none=True)
            case.test_type = TestType(case_input.type)
            case.target = _dump(target)
            case.assertions = [a.stored() for a in assertions]
            case.updated_at = utcnow()
            case = await uow.repo(TestCase).update(case)
            await uow.commit()
        return case

    async def delete_case(self, case_id: str) -> None:
        """Delete a test case, its place in every suite, and its results."""
        async with self._storage.unit_of_work() as uow:
            await delete_existing(uow.repo(TestCase), case_id, "test case")
            await uow.commit()

    async def _check_case(
        self,
        case_input: ModelPromptInput | WorkflowInput,
        target: Target | None,
        assertions: Sequence[AssertionSpec],
    ) -> None:
        parsed = parse_all([a.stored() for a in assertions], param="assertions")
        for index, assertion in enumerate(parsed):
            if assertion.provider is None:
                continue
            param = f"assertions.{index}.provider"
            if assertion.judged:
                await self._check_chat_model(assertion.provider, param)
            elif assertion.embedded:
                await self._check_embedding_model(assertion.provider, param)
        if target is not None:
            await self._check_target(target, "target")
            _check_pairing(case_input, target, "target")

    # ---- suites ------------------------------------------------------------------------------

    async def create_suite(self, data: TestSuiteCreate) -> SuiteView:
        """Store a suite of existing test cases, with its defaults checked."""
        await self._check_suite_settings(
            data.default_target, data.judge_model, data.embedding_model
        )
        suite = TestSuite(
            id=data.id,
            name=data.name or data.id,
            description=data.description,
            default_target=_dump(data.default_target),
            judge_model=data.judge_model,
            embedding_model=data.embedding_model,
            pass_threshold=data.pass_threshold,
            case_threshold=data.case_threshold,
            concurrency=data.concurrency,
            tags=data.tags,
        )
        try:
            async with self._storage.unit_of_work() as uow:
                await uow.repo(TestSuite).add(suite)
                await self._place_cases(uow, suite.id, data.case_ids)
                await uow.commit()
        except DuplicateKey as exc:
            raise Conflict(f"test suite '{data.id}' already exists", param="id") from exc
        log.info("test suite %s created with %d cases", suite.id, len(data.case_ids))
        return SuiteView(suite, list(data.case_ids))

    async def get_suite(self, suite_id: str) -> SuiteView:
        """The suite and its cases' ids, or `NotFound`."""
        async with self._storage.unit_of_work() as uow:
            suite = await get_existing(uow.repo(TestSuite), suite_id, "test suite")
            ids = await _case_ids(uow, [suite_id])
        return SuiteView(suite, ids.get(suite_id, []))

    async def list_suites(
        self, *, limit: int = 20, after: str | None = None
    ) -> tuple[Page[TestSuite], dict[str, builtins.list[str]]]:
        """Suites ordered by id, a page at a time, with each one's cases."""
        async with self._storage.unit_of_work() as uow:
            page = await uow.repo(TestSuite).find(order_by=["id"], limit=limit, after=after)
            ids = await _case_ids(uow, [s.id for s in page.items])
        return page, ids

    async def update_suite(self, suite_id: str, changes: TestSuiteUpdate) -> SuiteView:
        """Apply the changes; `case_ids` replaces the suite's cases."""
        fields = changes.model_dump(exclude_unset=True, exclude={"case_ids", "default_target"})
        async with self._storage.unit_of_work() as uow:
            suite = await get_existing(uow.repo(TestSuite), suite_id, "test suite")
            if "default_target" in changes.model_fields_set:
                suite.default_target = _dump(changes.default_target)
            for name, value in fields.items():
                setattr(suite, name, value)
            await self._check_suite_settings(
                _target_of(suite.default_target), suite.judge_model, suite.embedding_model
            )
            if changes.case_ids is not None:
                await uow.repo(TestSuiteCase).delete_where(Where.eq("suite_id", suite_id))
                await self._place_cases(uow, suite_id, changes.case_ids)
            suite.updated_at = utcnow()
            suite = await uow.repo(TestSuite).update(suite)
            ids = await _case_ids(uow, [suite_id])
            await uow.commit()
        return SuiteView(suite, ids.get(suite_id, []))

    async def delete_suite(self, suite_id: str) -> None:
        """Delete a suite and its runs (the test cases stay)."""
        async with self._storage.unit_of_work() as uow:
            await delete_existing(uow.repo(TestSuite), suite_id, "test suite")
            await uow.commit()

    async def _place_cases(self, uow: UnitOfWork, suite_id: str, case_ids: Sequence[str]) -> None:
        seen: dict[str, int] = {}
        for index, case_id in enumerate(case_ids):
            if case_id in seen:
                raise InvalidInput(
                    f"test case '{case_id}' is listed twice (at {seen[case_id]} and {index})",
                    param=f"case_ids.{index}",
                )
            seen[case_id] = index
        found = {c.id for c in await uow.repo(TestCase).get_many(list(case_ids))}
        for index, case_id in enumerate(case_ids):
            if case_id not in found:
                raise NotFound("test case", case_id, param=f"case_ids.{index}")
        await uow.repo(TestSuiteCase).add_many(
            [
                TestSuiteCase(
                    id=new_id("tsc"), suite_id=suite_id, test_case_id=case_id, position=index
                )
                for index, case_id in enumerate(case_ids)
            ]
        )

    async def _check_suite_settings(
        self, target: Target | None, judge_model: str | None, embedding_model: str | None
    ) -> None:
        if target is not None:
            await self._check_target(target, "default_target")
        if judge_model is not None:
            await self._check_chat_model(judge_model, "judge_model")
        if embedding_model is not None:
            await self._check_embedding_model(embedding_model, "embedding_model")

    # ---- starting runs -----------------------------------------------------------------------

    async def start_suite_run(self, suite_id: str, request: RunCreate, *, owner: Owner) -> TestRun:
        """Plan a run of the suite's enabled cases (or those asked for) and submit its job."""
        view = await self.get_suite(suite_id)
        suite = view.suite
        ids = view.case_ids
        if request.case_ids is not None:
            members = set(ids)
            for index, case_id in enumerate(request.case_ids):
                if case_id not in members:
                    raise InvalidInput(
                        f"test case '{case_id}' is not in suite '{suite_id}'",
                        param=f"case_ids.{index}",
                    )
            ids = list(dict.fromkeys(request.case_ids))
        if request.failed_from is not None:
            baseline = await self._run_of(request.failed_from, suite_id, param="failed_from")
            results = await self._results_by_case(baseline.id)
            ran = {c["id"] for c in baseline.cases}
            ids = [
                i
                for i in ids
                if i in ran and (i not in results or results[i].outcome != CaseOutcome.PASSED)
            ]
            if not ids:
                raise InvalidInput(
                    f"every case of run '{baseline.id}' passed: nothing to run again",
                    param="failed_from",
                )
        async with self._storage.unit_of_work() as uow:
            cases = [c for c in await uow.repo(TestCase).get_many(ids) if c.enabled]
        if not cases:
            raise InvalidInput(f"suite '{suite_id}' has no enabled test case to run", param="id")
        if request.target is not None:
            await self._check_target(request.target, "target")
        settings = {
            "target": _dump(request.target),
            "default_target": suite.default_target,
            "judge_model": request.judge_model or suite.judge_model,
            "embedding_model": request.embedding_model or suite.embedding_model,
            "pass_threshold": suite.pass_threshold,
            "case_threshold": suite.case_threshold,
            "concurrency": request.concurrency or suite.concurrency,
            "failed_from": request.failed_from,
        }
        return await self._start(cases, settings, owner, suite_id=suite_id)

    async def start_case_run(
        self, case_id: str, request: CaseRunCreate, *, owner: Owner
    ) -> TestRun:
        """Plan a run of one test case and submit its job."""
        case = await self.get_case(case_id)
        if not case.enabled:
            raise InvalidInput(f"test case '{case_id}' is disabled", param="id")
        if request.target is not None:
            await self._check_target(request.target, "target")
        settings = {
            "target": _dump(request.target),
            "default_target": None,
            "judge_model": request.judge_model,
            "embedding_model": request.embedding_model,
            "pass_threshold": 1.0,
            "case_threshold": None,
            "concurrency": 1,
        }
        return await self._start([case], settings, owner, test_case_id=case_id)

    async def _start(
        self,
        cases: Sequence[TestCase],
        settings: dict[str, Any],
        owner: Owner,
        *,
        suite_id: str | None = None,
        test_case_id: str | None = None,
    ) -> TestRun:
        for name, check in (
            ("judge_model", self._check_chat_model),
            ("embedding_model", self._check_embedding_model),
        ):
            if settings[name] is not None:
                await check(settings[name], name)
        planned = [_plan(case, settings) for case in cases]
        run = TestRun(
            id=new_id(RUN_ID_PREFIX),
            suite_id=suite_id,
            test_case_id=test_case_id,
            owner_key_id=owner.key_id,
            cases=planned,
            settings=settings,
        )
        # Each case's job carries its planned case: it reads nothing of the run's snapshot.
        children = [
            ChildSpec(
                OperationKind.TEST_CASE_RUN,
                {"run_id": run.id, "case": case, "settings": settings, "first": index == 0},
                meta={"run_id": run.id, "test_case_id": case["id"]},
            )
            for index, case in enumerate(planned)
        ]

        async def attach(uow: UnitOfWork, parent: Operation) -> None:
            run.operation_id = parent.id
            await uow.repo(TestRun).add(run)

        operation = await self._operations.submit_parent(
            kind=OperationKind.TEST_CASE_RUN,
            input={"run_id": run.id},
            owner=owner,
            children=children,
            meta={"run_id": run.id, "suite_id": suite_id, "cases": len(planned)},
            attach=attach,
            window=int(settings.get("concurrency") or 1),
            runs_after_children=True,
        )
        log.info("test run %s of %d cases submitted as %s", run.id, len(planned), operation.id)
        return run

    # ---- reading runs ------------------------------------------------------------------------

    async def get_run(self, run_id: str, *, suite_id: str | None = None) -> RunView:
        """The run as it stands (`NotFound` unless it is one of `suite_id`'s, when given)."""
        run = await self._run_of(run_id, suite_id)
        return (await self._views([run]))[0]

    async def list_runs(
        self,
        *,
        suite_id: str | None = None,
        test_case_id: str | None = None,
        limit: int = 20,
        after: str | None = None,
    ) -> tuple[Page[TestRun], builtins.list[RunView]]:
        """Runs of a suite (or of one case alone), newest first."""
        if suite_id is not None:
            await self.get_suite(suite_id)
        if test_case_id is not None:
            await self.get_case(test_case_id)
        where = given(Where.eq("suite_id", suite_id), Where.eq("test_case_id", test_case_id))
        page = await read_page(
            self._storage, TestRun, *where, order_by=["-created_at"], limit=limit, after=after
        )
        return page, await self._views(page.items)

    async def run_results(
        self,
        run_id: str,
        *,
        suite_id: str | None = None,
        outcome: CaseOutcome | None = None,
        limit: int = 20,
        after: str | None = None,
    ) -> Page[TestCaseResult]:
        """The results of a run's cases, in the order they finished."""
        run = await self._run_of(run_id, suite_id)
        where = [Where.eq("run_id", run.id), *given(Where.eq("outcome", outcome))]
        return await read_page(
            self._storage,
            TestCaseResult,
            *where,
            order_by=["created_at"],
            limit=limit,
            after=after,
        )

    async def case_results(
        self, case_id: str, *, limit: int = 20, after: str | None = None
    ) -> Page[TestCaseResult]:
        """A test case's results in every run, newest first: its history."""
        await self.get_case(case_id)
        return await read_page(
            self._storage,
            TestCaseResult,
            Where.eq("test_case_id", case_id),
            order_by=["-created_at"],
            limit=limit,
            after=after,
        )

    async def compare(
        self, run_id: str, baseline_id: str, *, suite_id: str | None = None
    ) -> Comparison:
        """Which cases stopped passing since the baseline run, and which started to."""
        run = await self._run_of(run_id, suite_id)
        baseline = await self._run_of(baseline_id, suite_id, param="baseline")
        now, then = await self._results_by_case(run.id), await self._results_by_case(baseline.id)
        names = {c["id"]: c.get("name", c["id"]) for c in [*baseline.cases, *run.cases]}
        regressions, improvements, unchanged = [], [], 0
        for case_id in [c["id"] for c in run.cases]:
            if case_id not in now or case_id not in then:
                continue
            current, before = now[case_id], then[case_id]
            change = CaseChange(case_id, names[case_id], before, current)
            if before.passed and not current.passed:
                regressions.append(change)
            elif current.passed and not before.passed:
                improvements.append(change)
            else:
                unchanged += 1
        return Comparison(
            run=run,
            baseline=baseline,
            regressions=regressions,
            improvements=improvements,
            unchanged=unchanged,
            only_in_run=sorted(now.keys() - then.keys()),
            only_in_baseline=sorted(then.keys() - now.keys()),
        )

    async def export(
        self, run_id: str, *, suite_id: str | None = None
    ) -> tuple[RunView, builtins.list[tuple[str, TestCaseResult]]]:
        """The run and every case's result with its name, in the run's order of cases."""
        view = await self.get_run(run_id, suite_id=suite_id)
        found = await self._results_by_case(view.run.id)
        rows = [
            (str(c.get("name", c["id"])), found[c["id"]])
            for c in view.run.cases
            if c["id"] in found
        ]
        return view, rows

    async def cancel_run(self, run_id: str, *, suite_id: str | None = None) -> RunView:
        """Cancel a pending or running run: every case's job not yet started is cancelled, and
        one under way stops at its next model call (or, done with its calls, keeps its result);
        the results of cases already done are kept."""
        run = await self._run_of(run_id, suite_id)
        while True:
            try:
                async with self._storage.unit_of_work() as uow:
                    job = (
                        await uow.repo(Operation).get(run.operation_id)
                        if run.operation_id is not None
                        else None
                    )
                    if job is not None and job.status not in TERMINAL:
                        await cancel_in(uow, job.id, events=self._operations.events)
                    current = await get_existing(uow.repo(TestRun), run.id, "test run")
                    if current.status in (RunStatus.PENDING, RunStatus.RUNNING):
                        # No counts kept: a cancelled run counts its results when read, those of
                        # cases that were finishing their calls included.
                        current.status = RunStatus.CANCELLED
                        current.finished_at = utcnow()
                        current.summary = {"run_id": current.id}
                        current.updated_at = utcnow()
                        await uow.repo(TestRun).update(current)
                    await uow.commit()
                break
            except StaleVersion:
                continue  # a case finished meanwhile, counted on the run's job: again
        return await self.get_run(run_id)

    async def _run_of(self, run_id: str, suite_id: str | None, *, param: str = "run_id") -> TestRun:
        check_run_id(run_id, param=param)
        async with self._storage.unit_of_work() as uow:
            run = await uow.repo(TestRun).get(run_id)
        if run is None or (suite_id is not None and run.suite_id != suite_id):
            raise NotFound("test run", run_id, param=param)
        return run

    async def _views(self, runs: Sequence[TestRun]) -> builtins.list[RunView]:
        async with self._storage.unit_of_work() as uow:
            ids = [r.operation_id for r in runs if r.operation_id]
            jobs = {o.id: o for o in await uow.repo(Operation).get_many(ids)}
            views = []
            for run in runs:
                job = jobs.get(run.operation_id or "")
                views.append(await _view(uow, run, job))
        return views

    async def _results_by_case(self, run_id: str) -> dict[str, TestCaseResult]:
        found: dict[str, TestCaseResult] = {}
        after = None
        async with self._storage.unit_of_work() as uow:
            while True:
                page = await uow.repo(TestCaseResult).find(
                    Where.eq("run_id", run_id), order_by=["id"], limit=_PAGE, after=after
                )
                found.update({r.test_case_id: r for r in page.items})
                if page.next_cursor is None:
                    return found
                after = page.next_cursor

    # ---- references ----------------------------------------------------------------------

    async def _check_target(self, target: Target, param: str) -> None:
        if isinstance(target, WorkflowTarget):
            if self._workflows is None:
                return  # stored as asked; a run of it reports that workflows are unavailable
            try:
                await self._workflows.check(target.workflow_id)
            except NotFound as exc:
                raise NotFound(
                    "workflow", target.workflow_id, param=f"{param}.workflow_id"
                ) from exc
            return
        if isinstance(target, PromptTarget):
            await self._check_prompt(target, param)
            await self._check_chat_model(target.model, f"{param}.model")
            return
        name = target.model if target.type == "model" else target.chain
        found = await self._models.get_callable(name, param=f"{param}.{target.type}")
        if target.type == "model" and not isinstance(found, Model):
            raise InvalidInput(
                f'\'{name}\' is a chain: give it as {{"type": "chain", "chain": "{name}"}}',
                param=f"{param}.model",
            )
        if target.type == "chain" and isinstance(found, Model):
            raise InvalidInput(
                f"'{name}' is a model, not a chain: give it as "
                f'{{"type": "model", "model": "{name}"}}',
                param=f"{param}.chain",
            )
        if isinstance(found, Model) and found.kind is not ModelKind.CHAT:
            raise InvalidInput(f"'{name}' is an embedding model", param=f"{param}.model")

    async def _check_prompt(self, target: PromptTarget, param: str) -> None:
        try:
            prompt = await self._prompts.get(target.prompt_id)
        except NotFound as exc:
            raise NotFound("prompt", target.prompt_id, param=f"{param}.prompt_id") from exc
        if not prompt.enabled:
            raise InvalidInput(
                f"prompt '{target.prompt_id}' is disabled", param=f"{param}.prompt_id"
            )
        if target.version is not None:
            try:
                await self._prompts.get_version(target.prompt_id, target.version)
            except NotFound as exc:
                exc.param = f"{param}.version"
                raise
        if target.label is not None and target.label not in prompt.labels:
            raise NotFound("prompt label", target.label, param=f"{param}.label")

    async def _check_chat_model(self, name: str, param: str) -> None:
        found = await self._models.get_callable(name, param=param)
        if isinstance(found, Model) and found.kind is not ModelKind.CHAT:
            raise InvalidInput(f"'{name}' is an embedding model, not a chat model", param=param)

    async def _check_embedding_model(self, name: str, param: str) -> None:
        model = await self._models.get_enabled(name, param=param)
        if model.kind is not ModelKind.EMBEDDING:
            raise InvalidInput(f"'{name}' is not an embedding model", param=param)


# ---- planning ----------------------------------------------------------------------------------


def _plan(case: TestCase, settings: dict[str, Any]) -> dict[str, Any]:
    """What a run will do with `case`: the case as it is now, with the target it will call
    (the run's, else its own, else the suite's default)."""
    target = settings.get("target") or case.target or settings.get("default_target")
    if target is None:
        raise InvalidInput(
            f"test case '{case.id}' has no target: give it one, give its suite a "
            "default_target, or give the run a target",
            param="target",
        )
    case_input = _input_of(case.input)
    parsed_target = _target_of(target)
    assert parsed_target is not None
    _check_pairing(case_input, parsed_target, "target", case_id=case.id)
    assertions = parse_all(case.assertions)
    for index, assertion in enumerate(assertions):
        if assertion.provider is not None:
            continue
        for needed, name in (
            (assertion.judged, "judge_model"),
            (assertion.embedded, "embedding_model"),
        ):
            if needed and settings.get(name) is None:
                raise InvalidInput(
                    f"test case '{case.id}' assertion {index} ({assertion.type}) needs a model: "
                    f"give the suite (or the run) a {name}, or the assertion a provider",
                    param=name,
                )
    return {
        "id": case.id,
        "name": case.name,
        "input": case.input,
        "target": target,
        "assertions": case.assertions,
        "threshold": case.threshold,
    }


def _check_pairing(
    case_input: ModelPromptInput | WorkflowInput,
    target: Target,
    param: str,
    *,
    case_id: str | None = None,
) -> None:
    """A workflow target takes a workflow input; any other a model input with a message."""
    whose = f"test case '{case_id}': " if case_id else ""
    if isinstance(target, WorkflowTarget) != isinstance(case_input, WorkflowInput):
        wanted = "workflow" if isinstance(target, WorkflowTarget) else "model_prompt"
        raise InvalidInput(
            f"{whose}a {target.type} target needs an input of type '{wanted}'",
            param=f"{param}.type",
        )
    if (
        isinstance(case_input, ModelPromptInput)
        and not isinstance(target, PromptTarget)
        and case_input.user_message is None
    ):
        raise InvalidInput(
            f"{whose}a {target.type} target needs input.user_message (only a prompt target "
            "can do without one)",
            param="input.user_message",
        )


def _input_of(stored: dict[str, Any]) -> ModelPromptInput | WorkflowInput:
    if stored.get("type") == "workflow":
        return WorkflowInput.model_validate(stored)
    return ModelPromptInput.model_validate(stored)


_TARGET: TypeAdapter[Target] = TypeAdapter(Target)


def _target_of(stored: dict[str, Any] | None) -> Target | None:
    return None if stored is None else _TARGET.validate_python(stored)


def _dump(target: Target | None) -> dict[str, Any] | None:
    return None if target is None else target.model_dump(exclude_none=True)


async def _case_ids(uow: UnitOfWork, suite_ids: Sequence[str]) -> dict[str, list[str]]:
    if not suite_ids:
        return {}
    rows = await uow.repo(TestSuiteCase).find(
        Where.in_("suite_id", list(suite_ids)), order_by=["suite_id", "position"]
    )
    ids: dict[str, list[str]] = {}
    for row in rows.items:
        ids.setdefault(row.suite_id, []).append(row.test_case_id)
    return ids


async def _tally(uow: UnitOfWork, run: TestRun) -> Tally:
    counts = await uow.repo(TestCaseResult).count_by("outcome", Where.eq("run_id", run.id))
    found = {CaseOutcome(outcome): group.count for outcome, group in counts.items()}
    return Tally(
        total=len(run.cases),
        passed=found.get(CaseOutcome.PASSED, 0),
        failed=found.get(CaseOutcome.FAILED, 0),
        errored=found.get(CaseOutcome.ERRORED, 0),
    )


_ENDED = {
    OperationStatus.FAILED: RunStatus.FAILED,
    OperationStatus.CANCELLED: RunStatus.CANCELLED,
}


async def _view(uow: UnitOfWork, run: TestRun, job: Operation | None) -> RunView:
    status = RunStatus(run.status)
    if status in (RunStatus.PENDING, RunStatus.RUNNING):
        # The job ended without completing the run (out of attempts, or cancelled through the
        # operations API), or it is gone (purged after its retention).
        if job is None:
            status = RunStatus.FAILED
        elif job.status in TERMINAL and job.status in _ENDED:
            status = _ENDED[OperationStatus(job.status)]
    summary = run.summary
    if status is RunStatus.COMPLETED and summary.get("progress"):
        return RunView(
            run,
            status,
            dict(summary["progress"]),
            bool(summary.get("passed")),
            summary.get("pass_rate"),
            summary.get("score"),
        )
    progress = summary.get("progress") or (await _tally(uow, run)).as_dict()
    return RunView(run, status, dict(progress), None, None, None)

"""`/admin/test-cases`, `/admin/test-suites` and `/admin/test-runs`: cases, suites, their runs
(accepted as jobs), each run's results and the comparison of two runs."""

from __future__ import annotations

import csv
import io
from typing import Annotated, Literal

import orjson
from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response

from app.access.deps import AdminDep
from app.access.service import Principal
from app.core.provide import provide
from app.core.schemas import Deleted, PageAfter, PageLimit
from app.evals.entities import CaseOutcome, RunStatus, TestCaseResult, TestRun, TestType
from app.evals.schemas import (
    CaseChange as CaseChangeRead,
)
from app.evals.schemas import (
    CaseResultList,
    CaseResultRead,
    CaseRunCreate,
    CaseSide,
    RunAccepted,
    RunComparison,
    RunCreate,
    RunList,
    RunProgress,
    RunRead,
    TestCaseCreate,
    TestCaseList,
    TestCaseRead,
    TestCaseUpdate,
    TestSuiteCreate,
    TestSuiteList,
    TestSuiteRead,
    TestSuiteUpdate,
)
from app.evals.service import CaseChange, Comparison, EvalService, RunView, SuiteView, run_owner
from app.operations.submit import Owner
from app.storage.protocol import Page

cases_router = APIRouter(prefix="/admin/test-cases", tags=["admin: evaluations"])
suites_router = APIRouter(prefix="/admin/test-suites", tags=["admin: evaluations"])
runs_router = APIRouter(prefix="/admin/test-runs", tags=["admin: evaluations"])

EvalsDep = Annotated[EvalService, Depends(provide(EvalService))]
BaselineQuery = Annotated[str, Query(description="The id of the run to compare with")]
FormatQuery = Annotated[Literal["json", "csv"], Query(description="`json` or `csv`")]
CSV_COLUMNS = (
    "test_case_id", "name", "outcome", "score", "execution_time_ms", "tokens_used", "cost_usd",
    "model", "failed_assertions", "error", "output",
)  # fmt: skip


def owner_of(principal: Principal) -> Owner:
    # A signed-in administrator has no key: the run's calls are made for their team.
    key_id = None if principal.user_id is not None else principal.key_id
    return run_owner(key_id, principal.team_id)


def suite_read(view: SuiteView) -> TestSuiteRead:
    suite = view.suite
    return TestSuiteRead(
        id=suite.id,
        name=suite.name,
        description=suite.description,
        case_ids=view.case_ids,
        default_target=suite.default_target,
        judge_model=suite.judge_model,
        embedding_model=suite.embedding_model,
        pass_threshold=suite.pass_threshold,
        case_threshold=suite.case_threshold,
        concurrency=suite.concurrency,
        tags=suite.tags,
        created_at=suite.created_at,
        updated_at=suite.updated_at,
    )


def run_read(view: RunView) -> RunRead:
    run = view.run
    return RunRead(
        id=run.id,
        suite_id=run.suite_id,
        test_case_id=run.test_case_id,
        operation_id=run.operation_id,
        status=view.status,
        progress=RunProgress(**view.progress),
        passed=view.passed,
        pass_rate=view.pass_rate,
        pass_threshold=float(run.settings.get("pass_threshold", 1.0)),
        score=view.score,
        settings=run.settings,
        created_at=run.created_at,
        started_at=run.started_at,
        finished_at=run.finished_at,
    )


def accepted(run: TestRun) -> RunAccepted:
    assert run.operation_id is not None
    return RunAccepted(id=run.id, operation_id=run.operation_id, status=RunStatus(run.status))


def _side(result: TestCaseResult) -> CaseSide:
    return CaseSide(outcome=result.outcome, score=result.score)


def run_list(page: Page[TestRun], views: list[RunView]) -> RunList:
    return RunList(
        data=[run_read(v) for v in views],
        has_more=page.next_cursor is not None,
        next_cursor=page.next_cursor,
    )


def comparison_read(found: Comparison) -> RunComparison:
    def change(item: CaseChange) -> CaseChangeRead:
        return CaseChangeRead(
            test_case_id=item.test_case_id,
            name=item.name,
            baseline=_side(item.baseline),
            current=_side(item.current),
        )

    return RunComparison(
        run_id=found.run.id,
        baseline_id=found.baseline.id,
        regressions=[change(c) for c in found.regressions],
        improvements=[change(c) for c in found.improvements],
        unchanged=found.unchanged,
        only_in_run=found.only_in_run,
        only_in_baseline=found.only_in_baseline,
    )


# ---- test cases ------------------------------------------------------------------------------


@cases_router.post("", response_model=TestCaseRead, status_code=201)
async def create_test_case(body: TestCaseCreate, admin: AdminDep, evals: EvalsDep) -> TestCaseRead:
    """Create a test case; it is refused unless it could run."""
    return TestCaseRead.of(await evals.create_case(body))


@cases_router.get("", response_model=TestCaseList)
async def list_test_cases(
    admin: AdminDep,
    evals: EvalsDep,
    test_type: TestType | None = None,
    enabled: bool | None = None,
    limit: PageLimit = 20,
    after: PageAfter = None,
) -> TestCaseList:
    """Test cases ordered by id."""
    page = await evals.list_cases(test_type=test_type, enabled=enabled, limit=limit, after=after)
    return TestCaseList.of(page, TestCaseRead.of)


@cases_router.get("/{case_id}", response_model=TestCaseRead)
async def get_test_case(case_id: str, admin: AdminDep, evals: EvalsDep) -> TestCaseRead:
    """A test case."""
    return TestCaseRead.of(await evals.get_case(case_id))


@cases_router.patch("/{case_id}", response_model=TestCaseRead)
async def update_test_case(
    case_id: str, body: TestCaseUpdate, admin: AdminDep, evals: EvalsDep
) -> TestCaseRead:
    """Change a test case; `assertions` replaces the list."""
    return TestCaseRead.of(await evals.update_case(case_id, body))


@cases_router.delete("/{case_id}", response_model=Deleted)
async def delete_test_case(case_id: str, admin: AdminDep, evals: EvalsDep) -> Deleted:
    """Delete a test case, its place in suites, and its results."""
    await evals.delete_case(case_id)
    return Deleted(id=case_id, object="test_case")


@cases_router.post("/{case_id}/runs", response_model=RunAccepted, status_code=202)
async def run_test_case(
    case_id: str, admin: AdminDep, evals: EvalsDep, body: CaseRunCreate | None = None
) -> RunAccepted:
    """Run one test case as a job; poll the run (or its operation) for the result."""
    run = await evals.start_case_run(case_id, body or CaseRunCreate(), owner=owner_of(admin))
    return accepted(run)


@cases_router.get("/{case_id}/runs", response_model=RunList)
async def list_test_case_runs(
    case_id: str, admin: AdminDep, evals: EvalsDep, limit: PageLimit = 20, after: PageAfter = None
) -> RunList:
    """The runs of this case alone, newest first."""
    page, views = await evals.list_runs(test_case_id=case_id, limit=limit, after=after)
    return run_list(page, views)


@cases_router.get("/{case_id}/results", response_model=CaseResultList)
async def list_test_case_results(
    case_id: str, admin: AdminDep, evals: EvalsDep, limit: PageLimit = 20, after: PageAfter = None
) -> CaseResultList:
    """This case's results in every run (suites' and its own), newest first."""
    page = await evals.case_results(case_id, limit=limit, after=after)
    return CaseResultList.of(page, CaseResultRead.of)


# ---- suites ----------------------------------------------------------------------------------


@suites_router.post("", response_model=TestSuiteRead, status_code=201)
async def create_test_suite(
    body: TestSuiteCreate, admin: AdminDep, evals: EvalsDep
) -> TestSuiteRead:
    """Create a suite of test cases."""
    return suite_read(await evals.create_suite(body))


@suites_router.get("", response_model=TestSuiteList)
async def list_test_suites(
    admin: AdminDep, evals: EvalsDep, limit: PageLimit = 20, after: PageAfter = None
) -> TestSuiteList:
    """Suites ordered by id."""
    page, ids = await evals.list_suites(limit=limit, after=after)
    return TestSuiteList.of(page, lambda s: suite_read(SuiteView(s, ids.get(s.id, []))))


@suites_router.get("/{suite_id}", response_model=TestSuiteRead)
async def get_test_suite(suite_id: str, admin: AdminDep, evals: EvalsDep) -> TestSuiteRead:
    """A suite and its cases."""
    return suite_read(await evals.get_suite(suite_id))


@suites_router.patch("/{suite_id}", response_model=TestSuiteRead)
async def update_test_suite(
    suite_id: str, body: TestSuiteUpdate, admin: AdminDep, evals: EvalsDep
) -> TestSuiteRead:
    """Change a suite; `case_ids` replaces its cases."""
    return suite_read(await evals.update_suite(suite_id, body))


@suites_router.delete("/{suite_id}", response_model=Deleted)
async def delete_test_suite(suite_id: str, admin: AdminDep, evals: EvalsDep) -> Deleted:
    """Delete a suite and its runs; its test cases stay."""
    await evals.delete_suite(suite_id)
    return Deleted(id=suite_id, object="test_suite")


@suites_router.post("/{suite_id}/runs", response_model=RunAccepted, status_code=202)
async def run_test_suite(
    suite_id: str, admin: AdminDep, evals: EvalsDep, body: RunCreate | None = None
) -> RunAccepted:
    """Run the suite as a job: its cases run on a worker, `concurrency` at a time."""
    run = await evals.start_suite_run(suite_id, body or RunCreate(), owner=owner_of(admin))
    return accepted(run)


@suites_router.get("/{suite_id}/runs", response_model=RunList)
async def list_test_suite_runs(
    suite_id: str,
    admin: AdminDep,
    evals: EvalsDep,
    limit: PageLimit = 20,
    after: PageAfter = None,
) -> RunList:
    """The suite's runs, newest first."""
    page, views = await evals.list_runs(suite_id=suite_id, limit=limit, after=after)
    return run_list(page, views)


@suites_router.get("/{suite_id}/runs/{run_id}", response_model=RunRead)
async def get_test_suite_run(
    suite_id: str, run_id: str, admin: AdminDep, evals: EvalsDep
) -> RunRead:
    """A run of the suite: its progress and, once completed, `passed` (the CI gate)."""
    return run_read(await evals.get_run(run_id, suite_id=suite_id))


@suites_router.get("/{suite_id}/runs/{run_id}/results", response_model=CaseResultList)
async def list_test_suite_run_results(
    suite_id: str,
    run_id: str,
    admin: AdminDep,
    evals: EvalsDep,
    outcome: CaseOutcome | None = None,
    limit: PageLimit = 20,
    after: PageAfter = None,
) -> CaseResultList:
    """The results of the run's cases, in the order they finished."""
    page = await evals.run_results(
        run_id, suite_id=suite_id, outcome=outcome, limit=limit, after=after
    )
    return CaseResultList.of(page, CaseResultRead.of)


@suites_router.get("/{suite_id}/runs/{run_id}/compare", response_model=RunComparison)
async def compare_test_suite_runs(
    suite_id: str, run_id: str, baseline: BaselineQuery, admin: AdminDep, evals: EvalsDep
) -> RunComparison:
    """The cases that regressed (passed in the baseline, not now) and improved since a run."""
    return comparison_read(await evals.compare(run_id, baseline, suite_id=suite_id))


@suites_router.post("/{suite_id}/runs/{run_id}/cancel", response_model=RunRead)
async def cancel_test_suite_run(
    suite_id: str, run_id: str, admin: AdminDep, evals: EvalsDep
) -> RunRead:
    """Cancel a run: no further case starts; finished cases keep their results."""
    return run_read(await evals.cancel_run(run_id, suite_id=suite_id))


# ---- any run, a suite's or a single case's -------------------------------------------------------


@runs_router.get("/{run_id}", response_model=RunRead)
async def get_test_run(run_id: str, admin: AdminDep, evals: EvalsDep) -> RunRead:
    """A run (of a suite or of one case): its progress and, once completed, `passed`."""
    return run_read(await evals.get_run(run_id))


@runs_router.get("/{run_id}/results", response_model=CaseResultList)
async def list_test_run_results(
    run_id: str,
    admin: AdminDep,
    evals: EvalsDep,
    outcome: CaseOutcome | None = None,
    limit: PageLimit = 20,
    after: PageAfter = None,
) -> CaseResultList:
    """The results of the run's cases, in the order they finished."""
    page = await evals.run_results(run_id, outcome=outcome, limit=limit, after=after)
    return CaseResultList.of(page, CaseResultRead.of)


@runs_router.get("/{run_id}/compare", response_model=RunComparison)
async def compare_test_runs(
    run_id: str, baseline: BaselineQuery, admin: AdminDep, evals: EvalsDep
) -> RunComparison:
    """The cases that regressed and improved since the baseline run."""
    return comparison_read(await evals.compare(run_id, baseline))


@runs_router.get(
    "/{run_id}/export",
    response_class=Response,
    responses={200: {"content": {"application/json": {}, "text/csv": {}}}},
)
async def export_test_run(
    run_id: str, admin: AdminDep, evals: EvalsDep, format: FormatQuery = "json"
) -> Response:
    """The run and every case's result, as one JSON document or a CSV table."""
    view, rows = await evals.export(run_id)
    filename = f"{view.run.id}.{format}"
    headers = {"content-disposition": f'attachment; filename="{filename}"'}
    if format == "json":
        document = {
            "run": run_read(view).model_dump(mode="json"),
            "results": [
                {"name": name, **CaseResultRead.of(result).model_dump(mode="json")}
                for name, result in rows
            ],
        }
        return Response(orjson.dumps(document), media_type="application/json", headers=headers)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    for name, result in rows:
        read = CaseResultRead.of(result)
        failed = [a["type"] for a in result.assertion_results if not a.get("passed")]
        writer.writerow(
            [
                read.test_case_id, name, read.outcome.value, read.score, read.execution_time_ms,
                read.tokens_used, read.cost_usd, read.model, " ".join(failed), read.error or "",
                read.output or "",
            ]
        )  # fmt: skip
    return Response(out.getvalue(), media_type="text/csv; charset=utf-8", headers=headers)


@runs_router.post("/{run_id}/cancel", response_model=RunRead)
async def cancel_test_run(run_id: str, admin: AdminDep, evals: EvalsDep) -> RunRead:
    """Cancel a run: no further case starts; finished cases keep their results."""
    return run_read(await evals.cancel_run(run_id))

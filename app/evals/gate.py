"""`gateway eval run`: a promptfoo-style config run against a gateway through its admin API.

The cases and the suite are written (created, or changed to what the file says, so a re-run
of the same file reuses them), a run is started and polled, and its results are read back.
The client is any `httpx.AsyncClient` holding the gateway's base URL and an admin key: a
remote gateway's, or one over an in-process app.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, TextIO

import httpx

from app.evals.promptfoo import Plan

FINAL = frozenset({"completed", "failed", "cancelled"})
BAR_WIDTH = 30


class GateError(Exception):
    """The run could not be judged; `code` is the exit status (2: the config, 3: the gateway)."""

    def __init__(self, message: str, code: int = 3) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Outcome:
    run: dict[str, Any]
    results: list[dict[str, Any]]
    threshold: float

    @property
    def pass_rate(self) -> float:
        return float(self.run.get("pass_rate") or 0.0)

    @property
    def passed(self) -> bool:
        return self.run.get("status") == "completed" and self.pass_rate >= self.threshold - 1e-9


def _error(response: httpx.Response) -> tuple[str, str | None]:
    try:
        error = response.json().get("error", {})
        return str(error.get("message") or response.text), error.get("param")
    except ValueError:
        return response.text[:500], None


async def _call(client: httpx.AsyncClient, method: str, path: str, **kw: Any) -> httpx.Response:
    try:
        response = await client.request(method, path, **kw)
    except httpx.HTTPError as exc:
        raise GateError(f"cannot reach the gateway at {client.base_url}: {exc}") from exc
    if response.status_code in (401, 403):
        raise GateError(
            f"the gateway refused the API key ({response.status_code}): an admin key is needed"
        )
    return response


async def _upsert(client: httpx.AsyncClient, path: str, body: dict[str, Any], what: str) -> None:
    response = await _call(client, "POST", path, json=body)
    if response.status_code == 409:
        changes = {k: v for k, v in body.items() if k != "id"}
        response = await _call(client, "PATCH", f"{path}/{body['id']}", json=changes)
    if response.status_code >= 400:
        message, param = _error(response)
        where = f" ({param})" if param else ""
        code = 2 if response.status_code < 500 else 3
        raise GateError(f"{what} refused{where}: {message}", code)


async def apply(client: httpx.AsyncClient, plan: Plan, threshold: float) -> None:
    """Create or update every case, then the suite with exactly these cases."""
    for case in plan.cases:
        await _upsert(client, "/admin/test-cases", case.body, f"test case {case.id} ({case.test})")
    suite = plan.suite | {
        "case_ids": [c.id for c in plan.cases],
        "pass_threshold": threshold,
    }
    await _upsert(client, "/admin/test-suites", suite, f"test suite {plan.suite_id}")


def progress_line(run: dict[str, Any]) -> str:
    p = run["progress"]
    total, done = p["total"], p["done"]
    filled = BAR_WIDTH * done // total if total else BAR_WIDTH
    bar = "#" * filled + "." * (BAR_WIDTH - filled)
    return (
        f"[{bar}] {done}/{total}  passed {p['passed']}  failed {p['failed']}  "
        f"errored {p['errored']}  ({run['status']})"
    )


async def run(
    client: httpx.AsyncClient,
    plan: Plan,
    threshold: float,
    *,
    poll_seconds: float = 1.0,
    timeout_seconds: float = 600.0,
    progress: TextIO | None = None,
) -> Outcome:
    """Write the cases and suite, run the suite, wait for the run, read its results."""
    await apply(client, plan, threshold)
    response = await _call(client, "POST", f"/admin/test-suites/{plan.suite_id}/runs", json={})
    if response.status_code != 202:
        message, _ = _error(response)
        raise GateError(f"the run was not started: {message}")
    run_id = response.json()["id"]
    deadline = time.monotonic() + timeout_seconds
    interactive = progress is not None and progress.isatty()
    shown = ""
    while True:
        response = await _call(client, "GET", f"/admin/test-runs/{run_id}")
        if response.status_code != 200:
            raise GateError(f"run {run_id} could not be read: {_error(response)[0]}")
        current = response.json()
        line = progress_line(current)
        if progress is not None and line != shown:
            progress.write(("\r" + line) if interactive else line + "\n")
            progress.flush()
            shown = line
        if current["status"] in FINAL:
            break
        if time.monotonic() > deadline:
            await _call(client, "POST", f"/admin/test-runs/{run_id}/cancel")
            raise GateError(f"run {run_id} did not finish within {timeout_seconds:g} s; cancelled")
        await asyncio.sleep(poll_seconds)
    if interactive and progress is not None:
        progress.write("\n")
    return Outcome(current, await results(client, run_id), threshold)


async def results(client: httpx.AsyncClient, run_id: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    after: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 100} | ({"after": after} if after else {})
        response = await _call(client, "GET", f"/admin/test-runs/{run_id}/results", params=params)
        if response.status_code != 200:
            raise GateError(f"the results of run {run_id} could not be read: {_error(response)[0]}")
        page = response.json()
        found.extend(page["data"])
        after = page.get("next_cursor")
        if not page.get("has_more") or not after:
            return found


# ---- what is shown -----------------------------------------------------------------------------


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def table(plan: Plan, outcome: Outcome) -> str:
    """One line per case, in the config's order: the verdict, score, latency and why it failed."""
    by_case = {r["test_case_id"]: r for r in outcome.results}
    rows = [("result", "score", "ms", "test", "prompt", "provider", "reason")]
    for case in plan.cases:
        result = by_case.get(case.id)
        if result is None:
            rows.append(("-", "", "", case.test, case.prompt, case.provider, "did not run"))
            continue
        failed = [a for a in result["assertion_results"] if not a.get("passed")]
        reason = result.get("error") or "; ".join(
            f"{a.get('type')}: {a.get('reason', '')}" for a in failed
        )
        score = "" if result["score"] is None else f"{result['score']:.2f}"
        rows.append((
            {"passed": "PASS", "failed": "FAIL"}.get(result["outcome"], "ERROR"),
            score,
            str(result["execution_time_ms"]),
            _clip(case.test, 30),
            _clip(case.prompt, 20),
            _clip(case.provider, 24),
            _clip(reason, 60),
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]  # fmt: skip
    run_ = outcome.run
    p = run_["progress"]
    verdict = "PASSED" if outcome.passed else "FAILED"
    lines.append("")
    lines.append(
        f"{verdict}: {p['passed']}/{p['total']} cases passed (pass rate {outcome.pass_rate:.2%}, "
        f"threshold {outcome.threshold:.2%}); run {run_['id']} {run_['status']}"
    )
    return "\n".join(lines)


def report(plan: Plan, outcome: Outcome, config: str) -> dict[str, Any]:
    """The JSON written by `--output`."""
    by_case = {r["test_case_id"]: r for r in outcome.results}
    return {
        "config": config,
        "suite_id": plan.suite_id,
        "threshold": outcome.threshold,
        "pass_rate": outcome.pass_rate,
        "passed": outcome.passed,
        "run": outcome.run,
        "results": [
            {
                "test_case_id": c.id,
                "test": c.test,
                "prompt": c.prompt,
                "provider": c.provider,
                "result": by_case.get(c.id),
            }
            for c in plan.cases
        ],
    }

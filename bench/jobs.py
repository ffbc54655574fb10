"""Throughput, latency and crash recovery of the job engine, against a raw Dramatiq baseline.

Run `python -m bench.jobs`. It uses only loopback services: a fresh PostgreSQL database
(`gateway_bench_jobs`, created, migrated and dropped at the end) and Redis database 14 (flushed at
start and end); `BENCH_JOBS_DATABASE_URL` and `BENCH_JOBS_REDIS_URL` choose others. Every
process it starts runs in its own session and is killed on the way out.

1. raw Dramatiq: N no-op messages, then N one-INSERT messages, drained by 2 processes x 8 threads
2. end to end: `gateway api` + `gateway worker --processes 2 --threads 8`, async chat completions
   submitted over HTTP until every operation row is completed
3. poll latency: GET /v1/operations/{id} at a fixed rate against completed jobs
4. recovery: SIGKILL the worker process holding a running job's lease; time until another worker
   re-claims it (its heartbeat stops: target 2 s, the lease being 5 s) and until it completes

Runs 1 and 2 also print the CPU a job costs, summed over every process involved (the workers,
the API, PostgreSQL, Redis, the bench's own client), from /proc: where all cores are busy, the
ratio of the two runs' rates is about the inverse of the ratio of these figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import orjson
import psycopg
import redis
from psycopg import sql
from sqlalchemy.engine import make_url

from app.operations.presence import PRESENCE_KEY
from app.storage.migrate import upgrade_to_head

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DATABASE_URL = os.environ.get(
    "BENCH_JOBS_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/gateway_bench_jobs"
)
REDIS_URL = os.environ.get("BENCH_JOBS_REDIS_URL", "redis://127.0.0.1:6379/14")
PORT = 8791
BASE = f"http://127.0.0.1:{PORT}"
ADMIN_KEY = "gw-bench-admin-key-0123456789abcdef"
RAW_JOBS = 6000
E2E_JOBS = 4000
WARMUP_JOBS = 16
CONCURRENCY = 32
POLL_RATE = 200  # requests per second
POLL_SECONDS = 10.0
RECOVERY_LATENCY_MS = 3000
RECOVERY_LEASE_SECONDS = 5  # the default JOB_LEASE_SECONDS
CHAT = {"model": "mock", "messages": [{"role": "user", "content": "Say hello to the bench."}]}

GATEWAY_ENV = {
    "STORAGE_BACKEND": "postgres",
    "DATABASE_URL": DATABASE_URL,
    "REDIS_URL": REDIS_URL,
    "BROKER": "redis",
    "SECRET_KEY": "bench-secret-xxxxxxxx",
    "ADMIN_API_KEY": ADMIN_KEY,
    "MOCK_LATENCY_MS": "0",
    "LOG_LEVEL": "WARNING",
}


# ---- processes, database, redis --------------------------------------------------------------


class Processes:
    """Subprocesses started in their own session, logged to files, killed group by group."""

    def __init__(self) -> None:
        self.logs = Path(tempfile.mkdtemp(prefix="bench-jobs-"))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.named: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: Sequence[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            list(argv),
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.procs.append(proc)
        self.named[name] = proc
        return proc

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
        """SIGTERM the process's group, then SIGKILL it if it lingers."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(grace)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # children left behind by a dead leader too
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(2)

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc, grace=3.0)
        self.procs.clear()


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def descendants(pid: int) -> list[int]:
    found = [pid]
    for child in children(pid):
        found += descendants(child)
    return found


TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_of(pid: int) -> tuple[str, float]:
    """A process's name and the CPU seconds it has used (user + system), from /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "", 0.0
    name, fields = (
        text[text.index("(") + 1 : text.rindex(")")],
        text[text.rindex(")") + 2 :].split(),
    )
    return name, (int(fields[11]) + int(fields[12])) / TICKS


class CpuMeter:
    """CPU seconds used by each kind of process between two samples: each process tree the
    bench started (by the name it gave it), PostgreSQL's, Redis's, and the bench's own (its
    HTTP client, or the raw baseline's sender). On a machine whose cores are all busy, the
    CPU a job costs in all of them is what bounds its rate."""

    def __init__(self, procs: Processes) -> None:
        self.procs = procs

    def sample(self) -> dict[int, tuple[str, float]]:
        """Every process of interest now: its group and its CPU seconds so far."""
        found: dict[int, tuple[str, float]] = {os.getpid(): ("bench", _cpu_of(os.getpid())[1])}
        for name, proc in self.procs.named.items():
            if proc.poll() is None:
                for pid in descendants(proc.pid):
                    found[pid] = (name, _cpu_of(pid)[1])
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) not in found:
                comm, seconds = _cpu_of(int(entry.name))
                if comm in ("postgres", "redis-server"):
                    found[int(entry.name)] = (comm.removesuffix("-server"), seconds)
        return found

    @staticmethod
    def per_job(
        before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], jobs: int
    ) -> dict[str, float]:
        """Milliseconds of CPU per job by group, most first (a process that ended between the
        samples is left out; none of the bench's do)."""
        used: dict[str, float] = {}
        for pid, (group, seconds) in after.items():
            used[group] = used.get(group, 0.0) + seconds - before.get(pid, (group, 0.0))[1]
        ranked = sorted(used.items(), key=lambda item: -item[1])
        return {group: seconds * 1000 / jobs for group, seconds in ranked if seconds > 0}


def show_cpu(label: str, per_job: dict[str, float]) -> str:
    total = sum(per_job.values())
    parts = ", ".join(f"{group} {ms:.2f}" for group, ms in per_job.items())
    print(f"  CPU per job, {label}: {total:.2f} ms ({parts})")
    return f"{total:.2f} ms"


def admin_url() -> tuple[str, str]:
    parsed = make_url(DATABASE_URL)
    admin = parsed.set(drivername="postgresql", database="postgres")
    return admin.render_as_string(hide_password=False), str(parsed.database)


def recreate_database() -> str:
    admin, name = admin_url()
    with psycopg.connect(admin, autocommit=True, connect_timeout=3) as conn:
        ident = sql.Identifier(name)
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(ident))
        return str(conn.info.parameter_status("server_version"))


def drop_database() -> None:
    admin, name = admin_url()
    with psycopg.connect(admin, autocommit=True, connect_timeout=3) as conn:
        ident = sql.Identifier(name)
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))


def wait_for(what: str, check: Callable[[], bool], timeout: float, every: float = 0.01) -> float:
    """Poll `check` until true; returns the seconds it took, raises after `timeout`."""
    began = time.perf_counter()
    while not check():
        if time.perf_counter() - began > timeout:
            raise TimeoutError(f"gave up waiting for {what} after {timeout:.0f} s")
        time.sleep(every)
    return time.perf_counter() - began


def percentile_ms(values: Sequence[float], q: int) -> float:
    if len(values) < 2:
        return values[0] * 1000 if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000


# ---- 1. raw Dramatiq ---------------------------------------------------------------------------


def raw_dramatiq(
    procs: Processes, db: psycopg.Connection[Any], r: redis.Redis
) -> tuple[dict[str, float], dict[str, float]]:
    """Jobs per second of each raw actor, and the CPU per job of the one-INSERT run."""
    # The raw actors read where to go from the environment, in this process as in theirs.
    os.environ["RAW_BENCH_REDIS_URL"], os.environ["RAW_BENCH_DSN"] = REDIS_URL, DATABASE_URL
    from bench import _raw_actors as raw

    db.execute(f"CREATE TABLE {raw.TABLE} (id bigserial PRIMARY KEY, n int NOT NULL)")
    env = {"RAW_BENCH_REDIS_URL": REDIS_URL, "RAW_BENCH_DSN": DATABASE_URL}
    argv = [str(BIN / "dramatiq"), "bench._raw_actors", "--processes", "2", "--threads", "8"]
    worker = procs.start("raw-worker", argv, env)
    try:
        wait_for("raw workers to boot", lambda: int(r.get(raw.BOOTED) or 0) >= 2, 30)
        results = {}
        for name, actor in (("noop", raw.noop), ("insert", raw.insert)):
            # Warm up: one message per thread opens connections; then measure from zero.
            for i in range(16):
                actor.send(i)
            wait_for("raw warm-up", lambda: int(r.get(raw.DONE) or 0) >= 16, 30)
            r.delete(raw.DONE)
            meter = CpuMeter(procs)
            before = meter.sample()
            began = time.perf_counter()
            for i in range(RAW_JOBS):
                actor.send(i)
            wait_for(
                f"raw {name} drain",
                lambda: int(r.get(raw.DONE) or 0) >= RAW_JOBS,
                60,
                every=0.002,
            )
            seconds = time.perf_counter() - began
            cpu = meter.per_job(before, meter.sample(), RAW_JOBS)
            r.delete(raw.DONE)
            results[name] = RAW_JOBS / seconds
            print(f"  raw {name:<6}: {RAW_JOBS} jobs in {seconds:.2f} s = {results[name]:,.0f}/s")
        rows = db.execute(f"SELECT count(*) FROM {raw.TABLE}").fetchone()
        print(f"  rows inserted by the insert actor: {rows[0] if rows else 0} (incl. 16 warm-up)")
        return results, cpu
    finally:
        procs.stop(worker)


# ---- 2. end to end -----------------------------------------------------------------------------


def usage_records(db: psycopg.Connection[Any]) -> int:
    row = db.execute("SELECT count(*) FROM usage_records").fetchone()
    return int(row[0]) if row else 0


def counts(db: psycopg.Connection[Any]) -> dict[str, int]:
    rows = db.execute("SELECT status, count(*) FROM operations GROUP BY status").fetchall()
    return {str(status): int(n) for status, n in rows}


def unfinished(db: psycopg.Connection[Any]) -> tuple[int, int]:
    """How many jobs are pending or running, and how many failed: what the end-to-end run polls
    for every 20 ms. It reads the status index's few entries of unfinished and failed jobs, not
    every row as `counts` does (~3 ms of the database's CPU per poll at 4,000 rows, and growing:
    a share of the CPU the measured run shares the machine with)."""
    row = db.execute(
        "SELECT count(*) FILTER (WHERE status <> 'failed'), count(*) FILTER (WHERE status = "
        "'failed') FROM operations WHERE status IN ('pending', 'running', 'failed')"
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


async def submit_many(
    client: aiohttp.ClientSession, n: int
) -> tuple[list[str], list[float], float]:
    """Submit `n` async chat completions, `CONCURRENCY` at a time; ids, latencies, first send."""
    ids: list[str] = []
    latencies: list[float] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    first = time.perf_counter()

    async def one_worker() -> None:
        while not queue.empty():
            queue.get_nowait()
            began = time.perf_counter()
            async with client.post("/v1/chat/completions?async=true", json=CHAT) as response:
                body = await response.read()
            latencies.append(time.perf_counter() - began)
            if response.status != 202:
                raise RuntimeError(f"submit answered {response.status}: {body!r}")
            ids.append(orjson.loads(body)["operation_id"])

    await asyncio.gather(*(one_worker() for _ in range(CONCURRENCY)))
    return ids, latencies, first


def client() -> aiohttp.ClientSession:
    # aiohttp rather than httpx: at 32+ connections httpx's own overhead dominates the figures
    # (bench/http_clients.py), and the client shares the machine's CPUs with the gateway.
    return aiohttp.ClientSession(
        base_url=BASE,
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        timeout=aiohttp.ClientTimeout(total=30),
        connector=aiohttp.TCPConnector(limit=64),
    )


def end_to_end(procs: Processes, db: psycopg.Connection[Any], r: redis.Redis) -> dict[str, Any]:
    # As the raw baseline waits for its 2 processes to boot, wait for both worker processes to
    # stamp their heartbeat (they do once booted, before consuming): a process still importing
    # the app would otherwise spend the measured seconds booting, not running jobs.
    wait_for("2 worker processes", lambda: r.zcard(PRESENCE_KEY) >= 2, 60, every=0.1)

    async def warmup() -> None:
        async with client() as http:
            await submit_many(http, WARMUP_JOBS)

    asyncio.run(warmup())
    wait_for("warm-up jobs", lambda: counts(db).get("completed", 0) >= WARMUP_JOBS, 60, every=0.05)

    done_at: list[float] = []
    meter = CpuMeter(procs)
    before = meter.sample()

    async def run() -> tuple[list[str], list[float], float, float]:
        async with client() as http:
            ids, latencies, first = await submit_many(http, E2E_JOBS)
        submitted = time.perf_counter()
        return ids, latencies, first, submitted

    ids, latencies, first, submitted = asyncio.run(run())

    def all_done() -> bool:
        left, failed = unfinished(db)
        if failed:
            raise RuntimeError(f"some jobs failed: {counts(db)}")
        if left == 0:
            done_at.append(time.perf_counter())
            return True
        return False

    wait_for("every job to complete", all_done, 120, every=0.02)
    seconds = done_at[0] - first
    return {
        "cpu": meter.per_job(before, meter.sample(), E2E_JOBS),
        "ids": ids,
        "submit_seconds": submitted - first,
        "submit_p50": percentile_ms(latencies, 50),
        "submit_p99": percentile_ms(latencies, 99),
        "seconds": seconds,
        "rate": E2E_JOBS / seconds,
    }


# ---- 3. poll latency ---------------------------------------------------------------------------


async def poll_latency(ids: Sequence[str]) -> tuple[list[float], int]:
    latencies: list[float] = []
    errors = 0
    total = int(POLL_RATE * POLL_SECONDS)

    async with client() as http:
        # Open every connection the client may use and touch the server's whole database pool
        # first (a second of polling at the same rate, not measured): the figure is steady-state
        # polling, not connection set-up.
        async def warm(op_id: str) -> None:
            async with http.get(f"/v1/operations/{op_id}") as response:
                await response.read()

        for _ in range(POLL_RATE // 64):
            await asyncio.gather(*(warm(i) for i in ids[:64]))
        await asyncio.sleep(0.5)
        start = time.perf_counter()

        async def one(k: int) -> None:
            nonlocal errors
            delay = start + k / POLL_RATE - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            began = time.perf_counter()
            async with http.get(f"/v1/operations/{ids[k % len(ids)]}") as response:
                body = await response.read()
            latencies.append(time.perf_counter() - began)
            if response.status != 200 or orjson.loads(body).get("status") != "completed":
                errors += 1

        await asyncio.gather(*(one(k) for k in range(total)))
    return latencies, errors


# ---- 4. recovery -------------------------------------------------------------------------------


def recovery(procs: Processes, db: psycopg.Connection[Any]) -> dict[str, Any]:
    env = {
        **GATEWAY_ENV,
        "MOCK_LATENCY_MS": str(RECOVERY_LATENCY_MS),
        "JOB_LEASE_SECONDS": str(RECOVERY_LEASE_SECONDS),
    }
    argv = [str(BIN / "gateway"), "worker", "--processes", "1", "--threads", "8"]
    leaders = [procs.start(f"recovery-worker-{k}", argv, env) for k in (1, 2)]
    wait_for("recovery workers to fork", lambda: all(children(p.pid) for p in leaders), 30)
    worker_pids = {leader.pid: children(leader.pid)[0] for leader in leaders}
    time.sleep(3.0)  # importing the app and booting the Dramatiq worker; no signal to wait on

    async def submit_one() -> str:
        async with client() as http:
            ids, _, _ = await submit_many(http, 1)
        return ids[0]

    def row(op_id: str) -> tuple[str, str | None, int]:
        found = db.execute(
            "SELECT status, lease_owner, attempts FROM operations WHERE id = %s", (op_id,)
        ).fetchone()
        assert found is not None
        return str(found[0]), found[1], int(found[2])

    op_id = asyncio.run(submit_one())
    wait_for("the job to run", lambda: row(op_id)[0] == "running", 30)
    _, owner, _ = row(op_id)
    assert owner is not None
    pid = int(owner.rsplit("-", 1)[1])
    if pid not in worker_pids.values():
        raise RuntimeError(f"lease owner {owner} is none of the worker processes {worker_pids}")
    os.kill(pid, signal.SIGKILL)
    killed = time.perf_counter()

    seen: dict[str, float] = {}
    new_owner: list[str | None] = []

    def completed() -> bool:
        status, lease_owner, _ = row(op_id)
        if status == "pending" and "pending" not in seen:
            seen["pending"] = time.perf_counter() - killed
        if status == "running" and lease_owner != owner and "running" not in seen:
            seen["running"] = time.perf_counter() - killed
            new_owner.append(lease_owner)
        return status == "completed"

    seconds = wait_for("the killed job to complete", completed, 60, every=0.02)
    _, _, attempts = row(op_id)
    leader_of_killed = next(lead for lead, child in worker_pids.items() if child == pid)
    killed_leader = next(p for p in leaders if p.pid == leader_of_killed)
    return {
        "seconds": seconds,
        "owner": owner,
        "new_owner": new_owner[0] if new_owner else None,
        "requeued_after": seen.get("pending"),
        "reclaimed_after": seen.get("running"),
        "attempts": attempts,
        "killed_leader_exit": killed_leader.poll(),
    }


# ---- the run -----------------------------------------------------------------------------------


def main() -> int:
    began = time.perf_counter()
    r = redis.Redis.from_url(REDIS_URL)
    try:
        r.ping()
        version = recreate_database()
    except (redis.RedisError, psycopg.OperationalError) as exc:
        print(f"PostgreSQL or Redis is not reachable: {exc}", file=sys.stderr)
        return 1
    r.flushdb()
    procs = Processes()
    summary: list[tuple[str, str, str]] = []
    try:
        upgrade_to_head(DATABASE_URL)
        print(
            f"python {platform.python_version()}, postgres {version}, {os.cpu_count()} CPUs, "
            f"logs in {procs.logs}"
        )
        with psycopg.connect(DATABASE_URL, autocommit=True) as db:
            print("\n1. raw Dramatiq (2 processes x 8 threads)")
            raw, raw_cpu = raw_dramatiq(procs, db, r)
            raw_total = show_cpu("raw + INSERT", raw_cpu)
            summary.append(("raw dramatiq no-op", f"{raw['noop']:,.0f} jobs/s", ""))
            summary.append(("raw dramatiq + 1 INSERT", f"{raw['insert']:,.0f} jobs/s", ""))

            print("\n2. end to end (gateway api + gateway worker --processes 2 --threads 8)")
            api = procs.start(
                "api", [str(BIN / "gateway"), "api", "--port", str(PORT)], GATEWAY_ENV
            )
            worker_argv = [str(BIN / "gateway"), "worker", "--processes", "2", "--threads", "8"]
            workers = procs.start("worker", worker_argv, GATEWAY_ENV)

            def ready() -> bool:
                if api.poll() is not None:
                    raise RuntimeError(f"the API exited; see {procs.logs}/api.log")
                try:
                    return httpx.get(f"{BASE}/ready", timeout=1).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_for("/ready", ready, 30, every=0.1)
            e2e = end_to_end(procs, db, r)
            ratio = e2e["rate"] / raw["insert"]
            print(
                f"  {E2E_JOBS} jobs: submitted in {e2e['submit_seconds']:.2f} s, all completed "
                f"{e2e['seconds']:.2f} s after the first submit = {e2e['rate']:,.0f} jobs/s"
            )
            print(
                f"  submit latency p50 {e2e['submit_p50']:.1f} ms, p99 {e2e['submit_p99']:.1f} ms"
                f" (concurrency {CONCURRENCY})"
            )
            print(f"  ratio to raw + INSERT: {ratio:.0%} (target >= 50 %)")
            e2e_total = show_cpu("end to end", e2e["cpu"])
            summary.append(("end-to-end", f"{e2e['rate']:,.0f} jobs/s", ""))
            summary.append(("end-to-end / raw+INSERT", f"{ratio:.0%}", ok(ratio >= 0.50)))
            summary.append(("CPU per job, e2e / raw+INSERT", f"{e2e_total} / {raw_total}", ""))
            summary.append(
                (
                    "submit latency p50 / p99",
                    f"{e2e['submit_p50']:.1f} / {e2e['submit_p99']:.1f} ms",
                    ok(e2e["submit_p99"] <= 15),
                )
            )

            print(f"\n3. poll latency ({POLL_RATE} req/s for {POLL_SECONDS:g} s)")
            # Every completed job committed its usage record with its outcome: none is pending.
            jobs = WARMUP_JOBS + E2E_JOBS
            recorded = usage_records(db)
            print(f"  (usage records of the {jobs} completed jobs: {recorded})")
            latencies, errors = asyncio.run(poll_latency(e2e["ids"]))
            p50, p99 = percentile_ms(latencies, 50), percentile_ms(latencies, 99)
            print(
                f"  {len(latencies)} requests, {errors} errors: p50 {p50:.1f} ms, p99 {p99:.1f} ms"
                " (target p99 <= 10 ms)"
            )
            summary.append(("poll latency p50 / p99", f"{p50:.1f} / {p99:.1f} ms", ok(p99 <= 10)))

            print(
                f"\n4. recovery after SIGKILL (2 x `gateway worker --processes 1`, "
                f"MOCK_LATENCY_MS={RECOVERY_LATENCY_MS}, "
                f"JOB_LEASE_SECONDS={RECOVERY_LEASE_SECONDS})"
            )
            procs.stop(workers)
            rec = recovery(procs, db)
            print(
                f"  killed {rec['owner']}; back to pending after {fmt(rec['requeued_after'])}, "
                f"re-claimed by {rec['new_owner']} after {fmt(rec['reclaimed_after'])}, "
                f"completed after {rec['seconds']:.2f} s (attempts={rec['attempts']}; "
                f"killed worker's parent exit code: {rec['killed_leader_exit']})"
            )
            summary.append(
                ("re-claimed after SIGKILL", fmt(rec["reclaimed_after"]), ok_within(rec, 2.0))
            )
            summary.append(
                ("recovery after SIGKILL", f"{rec['seconds']:.2f} s", ok(rec["seconds"] <= 10))
            )
    finally:
        procs.stop_all()
        with contextlib.suppress(Exception):
            r.flushdb()
        with contextlib.suppress(Exception):
            drop_database()
    print("\nsummary")
    width = max(len(name) for name, _, _ in summary)
    for name, value, verdict in summary:
        print(f"  {name:<{width}}  {value:>18}  {verdict}")
    print(f"\ntotal {time.perf_counter() - began:.1f} s")
    return 0


def ok(passed: bool) -> str:
    return "ok" if passed else "MISSED"


def ok_within(recovery: dict[str, Any], seconds: float) -> str:
    reclaimed = recovery["reclaimed_after"]
    return ok(reclaimed is not None and reclaimed <= seconds)


def fmt(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f} s"


if __name__ == "__main__":
    sys.exit(main())

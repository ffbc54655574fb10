"""The `gateway` command: the all-in-one dev process, the API, the worker, migrations, and
the evaluation gate (`gateway eval run`)."""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from app import __version__
from app.config import LogFormat, ProcessRole, Settings
from app.core.log_format import JsonFormatter, LogContextFilter

if TYPE_CHECKING:
    from app.evals.promptfoo import Plan

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


class BadSettings(Exception):
    """The environment describes a setup the settings refuse; the message says what to change."""


def describe(error: ValidationError) -> str:
    """The validators' sentences, one per line, prefixed by the field when there is one."""
    lines = []
    for item in error.errors():
        message = str(item["msg"]).removeprefix("Value error, ")
        field = ".".join(str(part) for part in item["loc"])
        lines.append(f"{field}: {message}" if field else message)
    return "\n".join(lines)


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment (and `.env`), with the command's own choices on top."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise BadSettings(describe(exc)) from exc


def log_config(settings: Settings) -> dict[str, Any]:
    """uvicorn's logging, plus a root handler whose lines carry the request id; with
    `LOG_FORMAT=json` every handler, uvicorn's access log included, writes JSON lines."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["filters"] = {"context": {"()": LogContextFilter}}
    config["formatters"]["app"] = {"format": LOG_FORMAT}
    config["handlers"]["app"] = {
        "class": "logging.StreamHandler",
        "formatter": "app",
        "filters": ["context"],
        "stream": "ext://sys.stderr",
    }
    if settings.log_format() is LogFormat.JSON:
        for name in ("app", "default", "access"):
            config["formatters"][name] = {"()": JsonFormatter}
            config["handlers"][name]["filters"] = ["context"]
    config["root"] = {"handlers": ["app"], "level": settings.LOG_LEVEL.upper()}
    # httpx logs every request's whole URL at INFO: a webhook's may carry a token (Slack's and
    # Discord's do); a delivery's attempts are in its delivery log, its failures counted.
    config["loggers"]["httpx"] = {"level": "WARNING"}
    return config


def configure_logging(settings: Settings) -> None:
    """Apply `log_config` to this process (a worker process: uvicorn applies it to the API)."""
    import logging.config

    logging.config.dictConfig(log_config(settings))


def _process_runner(name: str) -> Any:
    """A runner from `workers/` (dev, worker), resolved by name: `app/` never imports it."""
    return importlib.import_module(f"workers.{name}")


def _serve(
    settings: Settings,
    host: str | None,
    port: int | None,
    workers: int = 1,
    app: Any = None,
) -> int:
    import uvicorn

    from app.main import create_app

    options: dict[str, Any] = {
        "host": host or settings.HOST,
        "port": port or settings.PORT,
        "log_level": settings.LOG_LEVEL.lower(),
        "log_config": log_config(settings),
    }
    if workers == 1:
        uvicorn.run(app or create_app(settings), **options)
    else:
        # Each uvicorn worker is a new process that builds its own app from the environment.
        os.environ["PROCESS_ROLE"] = settings.PROCESS_ROLE.value
        uvicorn.run("app.main:create_app", factory=True, workers=workers, **options)
    return 0


def run_dev(args: argparse.Namespace) -> int:
    """API, worker and periodic jobs in one process (memory storage and fakeredis by default)."""
    settings = load_settings(PROCESS_ROLE=ProcessRole.DEV)
    app = _process_runner("dev").build_dev_app(settings)
    return _serve(settings, args.host, args.port, app=app)


def run_api(args: argparse.Namespace) -> int:
    """The HTTP API alone; workers run as separate `gateway worker` processes."""
    settings = load_settings(PROCESS_ROLE=ProcessRole.API)
    return _serve(settings, args.host, args.port, args.workers)


def run_worker(args: argparse.Namespace) -> int:
    """Dramatiq worker processes running jobs from the queues (all of them by default)."""
    settings = load_settings(PROCESS_ROLE=ProcessRole.WORKER)
    runner = _process_runner("main")
    return int(
        runner.run_worker(
            settings, processes=args.processes, threads=args.threads, queues=args.queues
        )
    )


class CommandFailed(Exception):
    """A one-off command could not do its work; the message says why, `code` is the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _run_once(command: str, work: Callable[[Settings], Coroutine[Any, Any, str]]) -> int:
    """Run a one-off command's `work` and print what it returns. Memory storage, where the work
    would die with the process, exits 2; a database or Redis out of reach exits 1; each with
    the reason on stderr."""
    import asyncio

    from app.core.errors import Unavailable
    from app.storage.factory import NotDurable

    try:
        print(asyncio.run(work(load_settings())))
    except NotDurable as exc:
        print(f"gateway {command}: {exc}", file=sys.stderr)
        return 2
    except Unavailable as exc:
        print(f"gateway {command}: {exc.message}", file=sys.stderr)
        return 1
    except CommandFailed as exc:
        print(f"gateway {command}: {exc}", file=sys.stderr)
        return exc.code
    return 0


def run_create_key(args: argparse.Namespace) -> int:
    """Print a new API key with admin rights (for a fresh install); it is shown only once."""
    from app.commands import create_admin_key

    async def create(settings: Settings) -> str:
        return await create_admin_key(settings, name=args.name)

    return _run_once("create-key", create)


def run_seed(args: argparse.Namespace) -> int:
    """Add the demo credential, mock models and sample prompts that are missing (idempotent)."""
    from app.seed import seed_database

    async def seed(settings: Settings) -> str:
        report = await seed_database(settings)
        return "Created: " + ", ".join(report.created) if report.created else "Nothing to add."

    return _run_once("seed", seed)


def run_rotate_secrets(args: argparse.Namespace) -> int:
    """Re-encrypt every stored secret with the first key of SECRET_KEY."""
    from app.core.crypto import UndecryptableSecret
    from app.rotation import rotate_secrets

    async def rotate(settings: Settings) -> str:
        try:
            rotated = await rotate_secrets(settings)
        except UndecryptableSecret as exc:
            raise CommandFailed(f"{exc}; keep the old key in SECRET_KEY") from exc
        return f"Re-encrypted {rotated.summary()} with the newest key."

    return _run_once("rotate-secrets", rotate)


def run_migrate(args: argparse.Namespace) -> int:
    """Upgrade the database at DATABASE_URL to the latest schema (creating it if missing)."""
    import psycopg
    from sqlalchemy.exc import OperationalError

    from app.core.database_url import InvalidDatabaseUrl, parse_database_url
    from app.storage.migrate import upgrade_to_head
    from app.storage.provision import CannotCreateDatabase, create_database_if_missing

    settings = load_settings()
    try:
        url = parse_database_url(settings.DATABASE_URL)
    except InvalidDatabaseUrl as exc:  # not PostgreSQL: only the postgres backend refuses it
        raise BadSettings(f"DATABASE_URL: {exc}") from exc
    where = url.redacted
    try:
        created_on = create_database_if_missing(url)
        if created_on is not None:
            print(f"Created database {url.database} on {created_on}.")
        print(f"Migrating {where} to the latest schema...")
        upgrade_to_head(settings.DATABASE_URL)
    except CannotCreateDatabase as exc:
        print(f"gateway migrate: {exc}", file=sys.stderr)
        return 1
    except (OperationalError, psycopg.OperationalError) as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        print(f"gateway migrate: cannot reach the database at {where}: {reason}", file=sys.stderr)
        return 1
    print("Done.")
    return 0


def run_healthcheck(args: argparse.Namespace) -> int:
    """Exit 0 when this host's gateway is healthy: the API answers /live, or (PROCESS_ROLE=worker)
    every worker process has shown its event loop turning within the last few heartbeats."""

    from app.system.liveness import check_workers

    settings = load_settings()
    role = ProcessRole(args.role) if args.role else settings.PROCESS_ROLE
    if role is ProcessRole.WORKER:
        max_age = HEARTBEATS_MISSED * settings.WORKER_HEARTBEAT_SECONDS
        problem = check_workers(Path(settings.WORKER_HEARTBEAT_DIR), max_age=max_age)
    else:
        problem = _live_problem(settings)
    if problem is not None:
        print(f"gateway healthcheck: {problem}", file=sys.stderr)
        return 1
    print("healthy")
    return 0


# A worker is unhealthy once this many heartbeats in a row have not come.
HEARTBEATS_MISSED = 6


def _live_problem(settings: Settings) -> str | None:
    import urllib.error
    import urllib.request

    host = settings.HOST if settings.HOST not in ("0.0.0.0", "::", "") else "127.0.0.1"
    url = f"http://{host}:{settings.PORT}/live"
    try:
        with urllib.request.urlopen(url, timeout=3) as answer:
            if answer.status == 200:
                return None
            return f"{url} answered {answer.status}"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"{url} did not answer: {reason}"


def run_eval(args: argparse.Namespace) -> int:
    """Run a promptfoo-style config (YAML) as a suite of the gateway: exit 0 when its pass rate
    reaches the threshold, 1 below it, 2 on a config error, 3 when the gateway cannot run it."""
    import asyncio

    from app.evals.promptfoo import ConfigError, load

    try:
        plan = load(Path(args.file), suite_id=args.suite_id)
    except ConfigError as exc:
        print(f"gateway eval run: invalid config {args.file}: {exc}", file=sys.stderr)
        return 2
    if args.threshold is not None:
        threshold = args.threshold
    else:
        threshold = plan.threshold if plan.threshold is not None else 1.0
    try:
        return asyncio.run(_run_eval(args, plan, threshold))
    except _GateFailed as exc:
        print(f"gateway eval run: {exc}", file=sys.stderr)
        return exc.code


class _GateFailed(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


async def _run_eval(args: argparse.Namespace, plan: Plan, threshold: float) -> int:
    import contextlib
    import secrets

    import httpx

    from app.evals import gate

    async with contextlib.AsyncExitStack() as stack:
        if args.in_process:
            from app.commands import in_process_gateway

            settings = load_settings(
                PROCESS_ROLE=ProcessRole.DEV,
                STORAGE_BACKEND="memory",
                BROKER="stub",
                ADMIN_API_KEY=None,
                # Set, so the throwaway gateway does not announce an administrator's password.
                ADMIN_DEFAULT_PASSWORD=secrets.token_urlsafe(24),
            )
            client, _ = await stack.enter_async_context(in_process_gateway(settings))
            poll = min(args.poll_interval, 0.1)
        else:
            url = args.url or os.environ.get("GATEWAY_URL")
            key = args.api_key or os.environ.get("GATEWAY_API_KEY")
            if not url or not key:
                missing = "--url (or GATEWAY_URL)" if not url else "--api-key (or GATEWAY_API_KEY)"
                raise _GateFailed(f"{missing} is needed, or --in-process", 2)
            client = await stack.enter_async_context(
                httpx.AsyncClient(
                    base_url=url.rstrip("/"),
                    headers={"Authorization": f"Bearer {key}"},
                    timeout=60,
                )
            )
            poll = args.poll_interval
        try:
            outcome = await gate.run(
                client,
                plan,
                threshold,
                poll_seconds=poll,
                timeout_seconds=args.timeout,
                progress=sys.stderr,
            )
        except gate.GateError as exc:
            raise _GateFailed(str(exc), exc.code) from exc
    print(gate.table(plan, outcome))
    if args.output:
        _write_report(args.output, gate.report(plan, outcome, args.file))
    return 0 if outcome.passed else 1


def _write_report(path: str, report: dict[str, Any]) -> None:
    import orjson

    Path(path).write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")


def _share(value: str) -> float:
    number = float(value)
    if not 0 <= number <= 1:
        raise argparse.ArgumentTypeError(f"must be from 0 to 1, not {value}")
    return number


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {number}")
    return number


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway",
        description="LLM gateway. Settings come from the environment (see README, 'Settings').",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=run.__doc__, description=run.__doc__)
        sub.set_defaults(run=run)
        return sub

    for name, run in (("dev", run_dev), ("api", run_api)):
        sub = command(name, run)
        sub.add_argument("--host", help="interface to bind (default: HOST)")
        sub.add_argument("--port", type=_positive, help="port to bind (default: PORT)")
        if name == "api":
            sub.add_argument(
                "--workers", type=_positive, default=1, help="uvicorn worker processes"
            )
    worker = command("worker", run_worker)
    worker.add_argument("--processes", type=_positive, help="default: WORKER_PROCESSES")
    worker.add_argument("--threads", type=_positive, help="default: WORKER_THREADS")
    worker.add_argument(
        "--queues", nargs="+", metavar="QUEUE", help="only these queues (default: all)"
    )
    command("migrate", run_migrate)
    create_key = command("create-key", run_create_key)
    create_key.add_argument("--name", default="Administrator", help="the key's name")
    command("seed", run_seed)
    command("rotate-secrets", run_rotate_secrets)
    health = command("healthcheck", run_healthcheck)
    health.add_argument(
        "--role", choices=["api", "worker"], help="what to check (default: PROCESS_ROLE)"
    )
    evals = commands.add_parser("eval", help="Evaluations from promptfoo-style configs")
    eval_commands = evals.add_subparsers(dest="eval_command", required=True, metavar="COMMAND")
    eval_run = eval_commands.add_parser("run", help=run_eval.__doc__, description=run_eval.__doc__)
    eval_run.set_defaults(run=run_eval)
    eval_run.add_argument("file", help="the promptfoo-style YAML config")
    eval_run.add_argument("--url", help="the gateway's base URL (default: GATEWAY_URL)")
    eval_run.add_argument("--api-key", help="an admin API key (default: GATEWAY_API_KEY)")
    eval_run.add_argument(
        "--in-process",
        action="store_true",
        help="run against a gateway built in this process (memory storage, mock models)",
    )
    eval_run.add_argument(
        "--threshold",
        type=_share,
        help="the share of cases that must pass (default: the config's `threshold`, else 1)",
    )
    eval_run.add_argument("--output", help="write the run and every result to this JSON file")
    eval_run.add_argument("--suite-id", help="the suite's id (default: from the file's path)")
    eval_run.add_argument(
        "--poll-interval", type=float, default=1.0, help="seconds between polls (default: 1)"
    )
    eval_run.add_argument(
        "--timeout", type=float, default=600.0, help="give up after this many seconds (600)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `gateway` console script."""
    args = _parser().parse_args(argv)
    try:
        return int(args.run(args))
    except BadSettings as exc:
        print(f"gateway {args.command}: invalid settings:\n{exc}", file=sys.stderr)
        return 2

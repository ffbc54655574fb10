"""`gateway worker`: Dramatiq worker processes consuming the job queues."""

from __future__ import annotations

import os
from pathlib import Path

from dramatiq.cli import main as dramatiq_main
from dramatiq.cli import make_argument_parser

from app.cli import configure_logging
from app.config import Settings
from app.queue.names import ALL_QUEUES
from app.system import liveness


def run_worker(
    settings: Settings,
    *,
    processes: int | None = None,
    threads: int | None = None,
    queues: list[str] | None = None,
) -> int:
    """Run worker processes until stopped (SIGTERM/SIGINT finish the jobs in hand first)."""
    unknown = sorted(set(queues or []) - set(ALL_QUEUES))
    if unknown:
        raise SystemExit(f"unknown queue(s) {', '.join(unknown)}; known: {', '.join(ALL_QUEUES)}")
    os.environ["PROCESS_ROLE"] = "worker"
    liveness.forget_departed(Path(settings.WORKER_HEARTBEAT_DIR))  # files of a crashed run
    argv = [
        "workers.actors",
        "--processes",
        str(processes or settings.WORKER_PROCESSES),
        "--threads",
        str(threads or settings.WORKER_THREADS),
        "--worker-shutdown-timeout",
        "30000",
        # Each process configures logging as the API does (`ProcessLogging`), not Dramatiq.
        "--skip-logging",
    ]
    if queues:
        argv += ["--queues", *queues]
    configure_logging(settings)  # the main process's own lines (start, stop, a crashed child)
    parser = make_argument_parser()  # type: ignore[no-untyped-call]
    return int(dramatiq_main(parser.parse_args(argv)) or 0)  # type: ignore[no-untyped-call]

"""Worker liveness through files: each worker process touches its own, `gateway healthcheck` reads
them (a worker serves no HTTP that an orchestrator could ask)."""

from __future__ import annotations

import os
import time
from pathlib import Path

PREFIX = "worker-"


def beat(directory: Path, pid: int | None = None) -> None:
    """Record that this process's event loop is turning (it is what runs the jobs)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{PREFIX}{pid or os.getpid()}").touch()


def forget(directory: Path, pid: int | None = None) -> None:
    """Remove this process's file at a clean stop."""
    (directory / f"{PREFIX}{pid or os.getpid()}").unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: it exists
    return True


def forget_departed(directory: Path) -> None:
    """Remove the files of processes that are gone (a run that crashed left them)."""
    for path in directory.glob(f"{PREFIX}*") if directory.is_dir() else []:
        pid_text = path.name.removeprefix(PREFIX)
        if not pid_text.isdigit() or not _running(int(pid_text)):
            path.unlink(missing_ok=True)


def check_workers(directory: Path, *, max_age: float, now: float | None = None) -> str | None:
    """Why the worker processes of this host are not healthy, or None when they all are.

    Healthy: at least one worker process has a file, and every running one touched it within
    `max_age` seconds. Files of processes that are gone are left over from a crash: ignored.
    """
    now = time.time() if now is None else now
    alive = 0
    for path in sorted(directory.glob(f"{PREFIX}*")) if directory.is_dir() else []:
        pid_text = path.name.removeprefix(PREFIX)
        if not pid_text.isdigit() or not _running(int(pid_text)):
            continue
        try:
            age = now - path.stat().st_mtime
        except FileNotFoundError:
            continue  # it stopped meanwhile
        if age > max_age:
            return f"worker process {pid_text} has not turned its event loop for {age:.0f} s"
        alive += 1
    if alive == 0:
        return f"no worker process has started here (no heartbeat in {directory})"
    return None

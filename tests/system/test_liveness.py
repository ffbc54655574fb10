"""Worker liveness: each `gateway worker` process's heartbeat file, and `gateway healthcheck`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.system import liveness
from tests.processes import Processes, env_for, free_port

DEPARTED_PID = 2**22 + 1  # above Linux's pid_max: never a running process


def test_a_worker_that_beat_recently_is_healthy(tmp_path: Path) -> None:
    liveness.beat(tmp_path)
    assert liveness.check_workers(tmp_path, max_age=5) is None


def test_a_running_worker_whose_heartbeat_is_old_is_unhealthy(tmp_path: Path) -> None:
    liveness.beat(tmp_path)
    problem = liveness.check_workers(tmp_path, max_age=5, now=time.time() + 60)
    assert problem is not None
    assert f"worker process {os.getpid()}" in problem


def test_without_any_running_worker_the_host_is_unhealthy(tmp_path: Path) -> None:
    liveness.beat(tmp_path, pid=DEPARTED_PID)  # a crashed run's file
    assert "no worker process has started" in (liveness.check_workers(tmp_path, max_age=5) or "")
    assert "no worker process has started" in (
        liveness.check_workers(tmp_path / "missing", max_age=5) or ""
    )


def test_files_of_departed_processes_are_forgotten_and_running_ones_kept(tmp_path: Path) -> None:
    liveness.beat(tmp_path, pid=DEPARTED_PID)
    liveness.beat(tmp_path)
    liveness.forget_departed(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [f"worker-{os.getpid()}"]


def _healthcheck(env: dict[str, str], role: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", "healthcheck", "--role", role],
        cwd=env.get("HOME", "/"),  # not the checkout, whose .env would be read
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def _until(condition: object, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.2)
    return False


@pytest.mark.slow
def test_healthcheck_follows_a_real_worker_from_start_through_a_stall(
    processes: Processes,
    database_url: str,
    redis_url: str,
    tmp_path: Path,
) -> None:
    beats = tmp_path / "beats"
    env = env_for(
        database_url,
        redis_url,
        WORKER_HEARTBEAT_DIR=str(beats),
        WORKER_HEARTBEAT_SECONDS="0.2",
        PROCESS_ROLE="worker",
    )
    assert _healthcheck(env, "worker").returncode == 1  # nothing started yet

    processes.start(["worker", "--processes", "1", "--threads", "2"], env)
    assert _until(lambda: _healthcheck(env, "worker").returncode == 0, 30)
    (child,) = (int(p.name.removeprefix("worker-")) for p in beats.iterdir())

    os.kill(child, signal.SIGSTOP)  # its event loop stops turning, the process stays
    try:
        assert _until(lambda: _healthcheck(env, "worker").returncode == 1, 10)
        stalled = _healthcheck(env, "worker")
        assert f"worker process {child} has not turned its event loop" in stalled.stderr
    finally:
        os.kill(child, signal.SIGCONT)
    assert _until(lambda: _healthcheck(env, "worker").returncode == 0, 10)


def _plain_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME")}
    return {**env, "LOG_LEVEL": "WARNING", **values}


def test_healthcheck_of_an_api_that_does_not_answer_says_where_it_asked() -> None:
    answer = _healthcheck(_plain_env(PORT="1"), "api")
    assert answer.returncode == 1
    assert "http://127.0.0.1:1/live did not answer" in answer.stderr


@pytest.mark.slow
def test_healthcheck_of_a_serving_api_is_healthy(processes: Processes) -> None:
    env = _plain_env(PORT=str(free_port()))
    processes.start(["dev"], env)
    assert _until(lambda: _healthcheck(env, "api").returncode == 0, 30)

"""redis-server processes of a test's own (TLS, passwords, ACL users, a unix socket); their
certificates come from `tests.tls`. The `redis_server` fixture (tests/conftest.py) stops them."""

from __future__ import annotations

import ctypes
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.tls import Certificates


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """In the child: stop when the test process dies, however it dies (Linux)."""
    if sys.platform == "linux":
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class RedisServer:
    """A redis-server on ports of its own; `stop` and `start` again keep the same addresses.

    `port` serves plain connections (0 with `tls` only), `tls_port` TLS ones, `socket` is
    the unix socket's path when asked for; `password` is the default user's, `users` are ACL
    users given as (name, password) with every right.
    """

    def __init__(
        self,
        directory: Path,
        *,
        tls: Certificates | None = None,
        tls_only: bool = False,
        tls_auth_clients: bool = False,
        password: str | None = None,
        users: tuple[tuple[str, str], ...] = (),
        unix_socket: bool = False,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.port = 0 if tls_only else free_port()
        self.tls_port = free_port() if tls is not None else None
        # A short path: a unix socket's may not exceed about a hundred bytes.
        self.socket = Path(tempfile.mkdtemp(prefix="redis-")) / "sock" if unix_socket else None
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "no", "--dir", str(directory)]
        if tls is not None:
            args += ["--tls-port", str(self.tls_port), "--tls-cert-file", str(tls.server_cert)]
            args += ["--tls-key-file", str(tls.server_key), "--tls-ca-cert-file", str(tls.ca)]
            args += ["--tls-auth-clients", "yes" if tls_auth_clients else "no"]
        if password is not None:
            args += ["--requirepass", password]
        for user, secret in users:
            args += ["--user", user, "on", f">{secret}", "~*", "&*", "+@all"]
        if self.socket is not None:
            args += ["--unixsocket", str(self.socket), "--unixsocketperm", "700"]
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        log = (self.directory / "redis.log").open("ab")
        self.process = subprocess.Popen(
            self.args, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
        )
        log.close()
        deadline = time.monotonic() + 10
        while not self._listening():
            if self.process.poll() is not None or time.monotonic() > deadline:
                output = (self.directory / "redis.log").read_text(errors="replace")
                self.stop()
                raise RuntimeError(f"redis-server did not start: {output[-2000:]}")
            time.sleep(0.02)
        return self

    def _listening(self) -> bool:
        try:
            if self.socket is not None:
                with socket.socket(socket.AF_UNIX) as sock:
                    sock.connect(str(self.socket))
            for port in (self.port, self.tls_port):
                if port:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        except OSError:
            return False
        return True

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)

    def remove(self) -> None:
        """Stop, and remove the socket's directory."""
        self.stop()
        if self.socket is not None:
            shutil.rmtree(self.socket.parent, ignore_errors=True)

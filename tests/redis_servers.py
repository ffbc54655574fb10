"""redis-server processes of a test's own (TLS, passwords, ACL users, a unix socket), and the
certificates a TLS one needs. The `redis_server` fixture (tests/conftest.py) stops them."""

from __future__ import annotations

import ctypes
import datetime
import ipaddress
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Certificates:
    """A certificate authority, a server certificate for 127.0.0.1 and localhost, and a client
    certificate, all signed by it (PEM files)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_certificates(directory: Path) -> Certificates:
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return path

    def write_cert(cert: x509.Certificate, path: Path) -> Path:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name("gateway test CA"))
        .issuer_name(name("gateway test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    def issue(common_name: str, usage: x509.ObjectIdentifier, server: bool) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(common_name))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        cert = builder.sign(ca_key, hashes.SHA256())
        return (
            write_cert(cert, directory / f"{common_name}.crt"),
            write_key(key, directory / f"{common_name}.key"),
        )

    server_cert, server_key = issue("server", ExtendedKeyUsageOID.SERVER_AUTH, server=True)
    client_cert, client_key = issue("client", ExtendedKeyUsageOID.CLIENT_AUTH, server=False)
    return Certificates(
        ca=write_cert(ca_cert, directory / "ca.crt"),
        server_cert=server_cert,
        server_key=server_key,
        client_cert=client_cert,
        client_key=client_key,
    )


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

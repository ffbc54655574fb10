"""REDIS_URL as operators write it: what each form means, and what is refused, and how."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from app.cli import main
from app.config import Settings
from app.core.redis_url import RedisEndpoint, RedisUrlError, TlsOptions, parse_redis_url
from tests.tls import Certificates

SECRET = "test-secret-key-of-sufficient-length"


@pytest.fixture(autouse=True)
def _no_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env


@pytest.mark.parametrize(
    ("url", "endpoint"),
    [
        pytest.param("redis://127.0.0.1:6379/0", RedisEndpoint(host="127.0.0.1"), id="plain"),
        pytest.param("redis://cache", RedisEndpoint(host="cache"), id="defaults"),
        pytest.param("redis://h:7000/3", RedisEndpoint(host="h", port=7000, db=3), id="db-path"),
        pytest.param("redis://h?db=4", RedisEndpoint(host="h", db=4), id="db-query"),
        pytest.param("redis://h/4?db=4", RedisEndpoint(host="h", db=4), id="db-both-agree"),
        pytest.param(
            "redis://:p%40ss%3Aw%2Frd%23@h/0",
            RedisEndpoint(host="h", password="p@ss:w/rd#"),
            id="percent-encoded-password",
        ),
        pytest.param(
            "redis://alice:secret@h/1",
            RedisEndpoint(host="h", db=1, username="alice", password="secret"),
            id="acl-user",
        ),
        pytest.param(
            "unix:///run/redis.sock?db=2", RedisEndpoint(path="/run/redis.sock", db=2), id="unix"
        ),
        pytest.param(
            "rediss://h:6380/0",
            RedisEndpoint(host="h", port=6380, tls=TlsOptions()),
            id="tls-verifies-by-default",
        ),
        pytest.param(
            "rediss://h/0?ssl_cert_reqs=none",
            RedisEndpoint(host="h", tls=TlsOptions(cert_reqs="none")),
            id="tls-unverified",
        ),
        pytest.param(
            "REDISS://h/0?ssl_cert_reqs=OPTIONAL&ssl_check_hostname=false",
            RedisEndpoint(host="h", tls=TlsOptions(cert_reqs="optional", check_hostname=False)),
            id="tls-case-insensitive",
        ),
    ],
)
def test_a_url_means_what_redis_py_reads_in_it(url: str, endpoint: RedisEndpoint) -> None:
    assert parse_redis_url(url) == endpoint


def test_tls_files_of_the_url_are_loaded_into_one_context(certificates: Certificates) -> None:
    endpoint = parse_redis_url(
        f"rediss://h/0?ssl_ca_certs={certificates.ca}"
        f"&ssl_certfile={certificates.client_cert}&ssl_keyfile={certificates.client_key}"
    )
    assert endpoint.tls == TlsOptions(
        ca_certs=str(certificates.ca),
        certfile=str(certificates.client_cert),
        keyfile=str(certificates.client_key),
    )
    context = endpoint.ssl_context()
    assert context is not None
    assert context.check_hostname
    # Trusted as well as the system's CAs, as redis-py's own context does.
    assert ((("commonName", "gateway test CA"),),) in [c["subject"] for c in context.get_ca_certs()]
    # The redis-py clients are handed the same options.
    kwargs = endpoint.pool_kwargs(asyncio=True)
    assert kwargs["ssl_ca_certs"] == str(certificates.ca)
    assert kwargs["ssl_cert_reqs"] == "required"
    assert kwargs["connection_class"].__name__ == "SSLConnection"


def test_no_check_means_no_host_name_check_either() -> None:
    context = parse_redis_url("rediss://h/0?ssl_cert_reqs=none").ssl_context()
    assert context is not None
    assert not context.check_hostname


def test_the_address_names_the_server_without_credentials() -> None:
    assert parse_redis_url("rediss://bob:hunter2@h:6380/2").address == "rediss://h:6380/2"
    assert parse_redis_url("unix://:hunter2@/run/r.sock?db=1").address == "unix:///run/r.sock?db=1"
    assert "hunter2" not in repr(parse_redis_url("rediss://bob:hunter2@h:6380/2"))


@pytest.mark.parametrize(
    ("url", "sentence"),
    [
        pytest.param(
            "redis+sentinel://:hunter2@sentinel:26379/mymaster",
            "Redis Sentinel and Redis Cluster are not supported",
            id="sentinel",
        ),
        pytest.param(
            "redis-cluster://:hunter2@c:7000",
            "Redis Sentinel and Redis Cluster are not supported",
            id="cluster",
        ),
        pytest.param(
            "127.0.0.1:6379", "must start with redis://, rediss:// (TLS) or unix://", id="bare"
        ),
        pytest.param("http://:hunter2@h/0", "not http://", id="another-scheme"),
        pytest.param(
            "redis://:hunter2@h:port/0", "its port must be a number", id="port-not-a-number"
        ),
        pytest.param("redis://:hunter2@h:99999/0", "its port must be a number", id="port-range"),
        # A password with an unencoded '/' splits the URL: urllib would quote part of it.
        pytest.param("redis://:hun/ter2@h/0", "its port must be a number", id="unencoded-slash"),
        pytest.param(
            "redis://:hun#ter2@h/0", "percent-encode it in the password", id="unencoded-hash"
        ),
        pytest.param("redis://:hunter2@h/cache", "path must be a database number", id="db-name"),
        pytest.param("redis://:hunter2@h/1?db=2", "database 1 in its path and 2", id="two-dbs"),
        pytest.param("redis://:hunter2@h?db=two", "Invalid value for 'db'", id="db-not-number"),
        pytest.param(
            "redis://:hunter2@h/0?socket_timeout=1&protocol=3",
            "options protocol, socket_timeout are not supported",
            id="unsupported-options",
        ),
        pytest.param(
            "redis://:hunter2@h/0?ssl_cert_reqs=none",
            "ssl_cert_reqs applies to TLS connections: use rediss://",
            id="tls-option-without-tls",
        ),
        pytest.param(
            "rediss://:hunter2@h/0?ssl_cert_reqs=yes",
            "ssl_cert_reqs must be one of none, optional, required",
            id="cert-reqs-unknown",
        ),
        pytest.param(
            "rediss://:hunter2@h/0?ssl_ca_certs=/nowhere/ca.pem",
            "ssl_ca_certs: /nowhere/ca.pem is not a file",
            id="ca-file-missing",
        ),
        pytest.param(
            "rediss://:hunter2@h/0?ssl_ca_path=/nowhere",
            "ssl_ca_path: /nowhere is not a directory",
            id="ca-dir-missing",
        ),
        pytest.param("unix://:hunter2@", "unix:// needs the socket's path", id="unix-no-path"),
    ],
)
def test_a_url_no_client_could_use_alike_is_refused_with_a_sentence(
    url: str, sentence: str
) -> None:
    with pytest.raises(RedisUrlError) as caught:
        parse_redis_url(url)
    assert sentence in str(caught.value)
    assert "hunter" not in str(caught.value) and "ter2" not in str(caught.value)


def test_a_file_that_is_not_a_certificate_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "ca.pem"
    junk.write_text("not a certificate")
    with pytest.raises(RedisUrlError, match="TLS files cannot be loaded"):
        parse_redis_url(f"rediss://h/0?ssl_ca_certs={junk}")


def test_a_key_that_does_not_match_its_certificate_is_refused(
    certificates: Certificates,
) -> None:
    with pytest.raises(RedisUrlError, match="TLS files cannot be loaded"):
        parse_redis_url(
            f"rediss://h/0?ssl_certfile={certificates.client_cert}"
            f"&ssl_keyfile={certificates.server_key}"
        )


def test_settings_with_the_redis_broker_refuse_an_unusable_url() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(
            STORAGE_BACKEND="postgres",  # type: ignore[arg-type]
            SECRET_KEY=SECRET,  # type: ignore[arg-type]
            BROKER="redis",  # type: ignore[arg-type]
            REDIS_URL="redis+sentinel://sentinel:26379/mymaster",
        )
    assert "Redis Sentinel and Redis Cluster are not supported" in str(caught.value)


def test_settings_without_a_real_redis_do_not_read_the_url() -> None:
    assert Settings(REDIS_URL="redis+sentinel://s:26379/m").REDIS_URL.startswith("redis+")


def test_the_gateway_exits_2_with_the_sentence_and_no_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("STORAGE_BACKEND", "postgres")
    monkeypatch.setenv("SECRET_KEY", SECRET)
    monkeypatch.setenv("BROKER", "redis")
    monkeypatch.setenv("REDIS_URL", "redis://:hunter2@h:6379/0?ssl_ca_certs=/etc/ca.pem")
    assert main(["api"]) == 2
    err = capsys.readouterr().err
    assert "ssl_ca_certs applies to TLS connections: use rediss://" in err
    assert "Traceback" not in err
    assert "hunter2" not in err

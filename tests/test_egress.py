"""The proxy rules read from the environment: which variables count, NO_PROXY as curl reads it."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from pydantic import ValidationError

from app.config import Settings
from app.core.egress import NoProxy, Proxy, ProxyRules


@pytest.fixture(autouse=True)
def environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    for name in list(os.environ):
        if name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)
    monkeypatch.delenv("REQUEST_METHOD", raising=False)
    yield monkeypatch


def test_without_proxy_variables_every_origin_is_direct() -> None:
    rules = ProxyRules.from_environment()
    assert not rules.configured
    assert rules.select("https", "api.openai.com", 443) is None


def test_each_scheme_takes_its_own_variable_and_all_proxy_fills_the_other(
    environment: pytest.MonkeyPatch,
) -> None:
    environment.setenv("HTTPS_PROXY", "http://secure-proxy:3128")
    environment.setenv("ALL_PROXY", "http://any-proxy:8080")
    rules = ProxyRules.from_environment()
    assert rules.select("https", "api.openai.com", 443) == Proxy("secure-proxy", 3128)
    assert rules.select("http", "vllm.internal", 80) == Proxy("any-proxy", 8080)


def test_lower_case_variables_win_over_upper_case_ones(environment: pytest.MonkeyPatch) -> None:
    environment.setenv("HTTPS_PROXY", "http://upper:1")
    environment.setenv("https_proxy", "http://lower:2")
    environment.setenv("NO_PROXY", "upper.example")
    environment.setenv("no_proxy", "lower.example")
    rules = ProxyRules.from_environment()
    assert rules.https == Proxy("lower", 2)
    assert rules.select("https", "lower.example", 443) is None
    assert rules.select("https", "upper.example", 443) == Proxy("lower", 2)


def test_a_proxy_without_scheme_or_port_is_http_on_port_80(
    environment: pytest.MonkeyPatch,
) -> None:
    environment.setenv("HTTP_PROXY", "proxy.corp")
    assert ProxyRules.from_environment().http == Proxy("proxy.corp", 80)


def test_proxy_credentials_are_decoded_sent_as_basic_and_never_shown() -> None:
    proxy = Proxy.parse("http://gw%20user:p%40ss@proxy.corp:3128", "HTTPS_PROXY")
    assert (proxy.username, proxy.password) == ("gw user", "p@ss")
    assert proxy.authorization == "Basic Z3cgdXNlcjpwQHNz"  # base64 of "gw user:p@ss"
    assert proxy.headers == {"proxy-authorization": "Basic Z3cgdXNlcjpwQHNz"}
    for shown in (str(proxy), repr(proxy), proxy.url):
        assert "p@ss" not in shown and "gw user" not in shown
    assert str(proxy) == "http://proxy.corp:3128"
    assert Proxy.parse("http://proxy.corp:3128", "HTTPS_PROXY").headers == {}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("socks5://user:hunter2@socks.corp:1080", "only http:// proxies are supported"),
        ("https://user:hunter2@proxy.corp:443", "only http:// proxies are supported"),
        ("http://user:hunter2@:3128", "must be a URL such as http://proxy.example:3128"),
        ("http://user:hunter2@proxy.corp:99999", "must be a URL such as http://proxy"),
    ],
)
def test_a_proxy_the_clients_cannot_use_is_refused_without_showing_its_password(
    environment: pytest.MonkeyPatch, value: str, message: str
) -> None:
    environment.setenv("HTTPS_PROXY", value)
    with pytest.raises(ValueError, match="HTTPS_PROXY") as refused:
        ProxyRules.from_environment()
    assert message in str(refused.value)
    assert "hunter2" not in str(refused.value)


def test_settings_refuse_an_unusable_proxy_with_a_sentence(
    environment: pytest.MonkeyPatch,
) -> None:
    environment.setenv("ALL_PROXY", "socks5h://socks.corp:1080")
    with pytest.raises(ValidationError, match=r"ALL_PROXY is socks5h://socks\.corp…: only http"):
        Settings()


def test_an_unused_all_proxy_is_not_refused(environment: pytest.MonkeyPatch) -> None:
    environment.setenv("ALL_PROXY", "socks5://socks.corp:1080")
    environment.setenv("HTTP_PROXY", "http://proxy.corp:3128")
    environment.setenv("HTTPS_PROXY", "http://proxy.corp:3128")
    assert ProxyRules.from_environment().https == Proxy("proxy.corp", 3128)


@pytest.mark.parametrize(
    ("no_proxy", "host", "port", "exempt"),
    [
        ("example.com", "example.com", 443, True),
        ("example.com", "api.example.com", 443, True),
        ("example.com", "notexample.com", 443, False),
        (".example.com", "example.com", 443, True),
        ("*.example.com", "api.example.com", 443, True),
        ("Example.COM.", "api.example.com.", 443, True),
        ("*", "anything.at.all", 80, True),
        ("a.test  b.test,c.test", "b.test", 80, True),
        ("10.0.0.0/8", "10.1.2.3", 80, True),
        ("10.0.0.0/8", "11.1.2.3", 80, False),
        ("10.0.0.7", "10.0.0.7", 80, True),
        ("0.7", "10.0.0.7", 80, False),  # an address is not matched as a name suffix
        ("localhost", "127.0.0.1", 80, False),  # nor a name resolved to an address
        ("127.0.0.1", "localhost", 80, False),
        ("::1", "::1", 80, True),
        ("[::1]:8080", "::1", 8080, True),
        ("[::1]:8080", "::1", 8081, False),
        ("fd00::/8", "fd12::5", 443, True),
        ("internal.test:8443", "internal.test", 8443, True),
        ("internal.test:8443", "internal.test", 443, False),
        ("10.0.0.0/8:80", "10.0.0.1", 80, True),
        ("10.0.0.0/8:80", "10.0.0.1", 81, False),
        ("", "example.com", 443, False),
    ],
)
def test_no_proxy_matches_as_curl_does(no_proxy: str, host: str, port: int, exempt: bool) -> None:
    assert NoProxy(no_proxy).matches(host, port) is exempt


class CountingNoProxy(NoProxy):
    def __init__(self) -> None:
        super().__init__("")
        self.asked = 0

    def matches(self, host: str, port: int) -> bool:
        self.asked += 1
        return False


def test_an_origins_proxy_is_decided_once() -> None:
    rules = ProxyRules(https=Proxy("proxy.corp", 3128))
    counting = CountingNoProxy()
    rules.no_proxy = counting
    for _ in range(3):
        assert rules.select("https", "api.openai.com", 443) == Proxy("proxy.corp", 3128)
    rules.select("https", "api.anthropic.com", 443)
    assert counting.asked == 2

"""The outbound client's guard: every spelling of an internal address, DNS, redirects, bounds."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from app import __version__
from app.core.errors import InvalidInput
from app.core.outbound import (
    ForbiddenDestination,
    OutboundClient,
    OutboundFailed,
    OutboundPolicy,
    forbidden_reason,
    parse_host_address,
)
from tests.tls import make_authority
from tests.webhooks.receiver import Received, Receiver, Reply, Respond

LOOPBACK_ONLY = OutboundPolicy.parse("127.0.0.1/32")


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    server = await Receiver().start()
    yield server
    await server.close()


@pytest.mark.parametrize(
    ("spelling", "address"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("017700000001", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("0x7f.0.0.1", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("0xa9.254.0251.0376", "169.254.169.254"),
        ("[::ffff:127.0.0.1]", "::ffff:7f00:1"),
        ("::ffff:7f00:1", "::ffff:7f00:1"),
        ("example.com", None),
        ("1.2.3.4.5", None),
        ("256.1.1.1", None),
    ],
)
def test_every_numeric_spelling_is_read_as_the_address_a_resolver_would_use(
    spelling: str, address: str | None
) -> None:
    parsed = parse_host_address(spelling)
    assert (str(parsed) if parsed else None) == address


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://2130706433/",
        "http://017700000001/",
        "http://0x7f.0.0.1/",
        "http://0x7f000001/",
        "http://127.1/",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://[::ffff:7f00:1]/",
        "http://10.0.0.1/",
        "http://172.16.5.4/",
        "http://192.168.1.1/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fe80::1]/",
        "http://[fd00::1]/",
        "http://[fd00:ec2::254]/",
        "http://224.0.0.1/",
        "http://[ff02::1]/",
        "http://0.0.0.0/",
        "http://0/",
        "http://[::]/",
        "http://100.100.100.200/",
        "http://[64:ff9b::a00:1]/",
        "http://[2002:a00:1::]/",
        "http://metadata.google.internal/computeMetadata/v1/",
    ],
)
async def test_the_guard_refuses_internal_addresses_in_every_spelling(url: str) -> None:
    async def resolver(host: str, port: int) -> list[str]:
        raise AssertionError(f"{host} should have been refused before any lookup")

    client = OutboundClient(OutboundPolicy(), resolver=resolver)
    try:
        with pytest.raises(ForbiddenDestination) as refused:
            await client.request("GET", url, timeout=2)
        assert refused.value.param == "url"
    finally:
        await client.aclose()


async def test_an_octal_dotted_address_httpx_cannot_parse_is_refused_too() -> None:
    client = OutboundClient(OutboundPolicy())
    try:
        with pytest.raises(InvalidInput):
            await client.request("GET", "http://0177.0.0.1/", timeout=2)
    finally:
        await client.aclose()


def test_public_addresses_pass_and_each_internal_range_has_its_reason() -> None:
    assert forbidden_reason(ipaddress.ip_address("8.8.8.8")) is None
    assert forbidden_reason(ipaddress.ip_address("2606:4700:4700::1111")) is None
    reasons = {
        "127.0.0.1": "loopback",
        "10.1.1.1": "private",
        "169.254.1.1": "link-local",
        "169.254.169.254": "metadata",
        "fc00::1": "unique-local",
        "239.1.1.1": "multicast",
        "0.0.0.0": "unspecified",
        "::ffff:10.0.0.1": "private",
    }
    for address, word in reasons.items():
        reason = forbidden_reason(ipaddress.ip_address(address))
        assert reason is not None and word in reason, (address, reason)


async def test_a_hostname_resolving_to_a_private_address_is_refused() -> None:
    async def resolver(host: str, port: int) -> list[str]:
        return ["10.20.30.40"]

    client = OutboundClient(OutboundPolicy(), resolver=resolver)
    try:
        with pytest.raises(
            ForbiddenDestination, match=r"internal\.example\.com \(10\.20\.30\.40\)"
        ):
            await client.request("POST", "https://internal.example.com/hook", timeout=2)
    finally:
        await client.aclose()


async def test_one_private_answer_among_public_ones_is_refused() -> None:
    async def resolver(host: str, port: int) -> list[str]:
        return ["93.184.216.34", "192.168.0.10"]

    client = OutboundClient(OutboundPolicy(), resolver=resolver)
    try:
        with pytest.raises(ForbiddenDestination):
            await client.request("GET", "http://mixed.example.com/", timeout=2)
    finally:
        await client.aclose()


async def test_the_connection_goes_to_the_checked_address_not_a_second_lookup(
    receiver: Receiver,
) -> None:
    lookups: list[str] = []

    async def resolver(host: str, port: int) -> list[str]:
        lookups.append(host)
        return ["127.0.0.1"]  # allowed below; no system resolver knows this name

    client = OutboundClient(LOOPBACK_ONLY, resolver=resolver)
    try:
        response = await client.request("GET", f"http://hooks.test:{receiver.port}/x", timeout=2)
    finally:
        await client.aclose()
    assert response.status_code == 200
    assert lookups == ["hooks.test"]
    assert receiver.requests[0].headers["host"] == f"hooks.test:{receiver.port}"


async def test_a_redirect_to_a_refused_host_is_not_followed(receiver: Receiver) -> None:
    async def resolver(host: str, port: int) -> list[str]:
        return ["192.168.7.7"] if host == "private.example" else ["127.0.0.1"]

    client = OutboundClient(LOOPBACK_ONLY, resolver=resolver)
    try:
        for target in ("http://10.0.0.5/admin", "http://private.example/", "http://[::1]/"):
            receiver.respond = _redirect_to(target)
            with pytest.raises(ForbiddenDestination):
                await client.request("GET", receiver.url, timeout=2, follow_redirects=True)
        receiver.respond = _redirect_to(f"http://127.0.0.1:{receiver.port}/next")
        hops = len(receiver.requests)
        with pytest.raises(OutboundFailed, match="redirects"):
            await client.request("GET", receiver.url, timeout=2, follow_redirects=True)
    finally:
        await client.aclose()
    assert len(receiver.requests) == hops + 6  # an allowed target is followed, five times at most


def _redirect_to(location: str) -> Respond:
    async def respond(request: Received) -> Reply:
        return 302, b"", {"Location": location}

    return respond


async def test_redirects_are_not_followed_unless_asked(receiver: Receiver) -> None:
    receiver.respond = _redirect_to("http://10.0.0.5/")
    client = OutboundClient(LOOPBACK_ONLY)
    try:
        response = await client.request("GET", receiver.url, timeout=2)
    finally:
        await client.aclose()
    assert response.status_code == 302


async def test_allowed_host_names_and_ranges_reach_loopback(receiver: Receiver) -> None:
    for policy in (OutboundPolicy.parse("localhost"), OutboundPolicy.parse(" 127.0.0.0/8 ,x")):
        client = OutboundClient(policy)
        try:
            host = "localhost" if policy.hosts == {"localhost"} else "127.0.0.1"
            response = await client.request("GET", f"http://{host}:{receiver.port}/", timeout=2)
        finally:
            await client.aclose()
        assert response.status_code == 200
    refused = OutboundClient(OutboundPolicy.parse("10.0.0.0/8"))
    try:
        with pytest.raises(ForbiddenDestination):
            await refused.request("GET", receiver.url, timeout=2)
    finally:
        await refused.aclose()


async def test_responses_are_bounded_in_size(receiver: Receiver) -> None:
    async def big(request: Received) -> Reply:
        return 200, b"x" * 50_000

    receiver.respond = big
    client = OutboundClient(LOOPBACK_ONLY)
    try:
        with pytest.raises(OutboundFailed, match="larger than 1000 bytes"):
            await client.request("GET", receiver.url, timeout=2, max_response_bytes=1000)
        kept = await client.request(
            "GET", receiver.url, timeout=2, max_response_bytes=1000, truncate=True
        )
    finally:
        await client.aclose()
    assert kept.truncated and kept.body == b"x" * 1000


async def test_a_slow_answer_times_out_as_a_whole(receiver: Receiver) -> None:
    async def slow(request: Received) -> Reply:
        await asyncio.sleep(2)
        return 200, b""

    receiver.respond = slow
    client = OutboundClient(LOOPBACK_ONLY)
    started = asyncio.get_running_loop().time()
    try:
        with pytest.raises(OutboundFailed, match=r"within 0\.3 s"):
            await client.request("GET", receiver.url, timeout=0.3)
    finally:
        await client.aclose()
    assert asyncio.get_running_loop().time() - started < 1.5


async def test_requests_say_they_come_from_this_gateway_version(receiver: Receiver) -> None:
    client = OutboundClient(LOOPBACK_ONLY)
    try:
        await client.request("POST", receiver.url, content=b"{}", timeout=2)
    finally:
        await client.aclose()
    assert receiver.requests[0].headers["user-agent"] == f"llm-gateway/{__version__}"


async def test_the_proxy_of_the_environment_is_never_used(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The guard checks the address it connects to; through a proxy it could check nothing.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # the discard port: nothing answers
    client = OutboundClient(LOOPBACK_ONLY)
    try:
        response = await client.request("GET", receiver.url, timeout=2)
    finally:
        await client.aclose()
    assert response.status_code == 200 and len(receiver.requests) == 1


async def test_https_endpoints_are_verified_against_the_operators_ca_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    authority = make_authority(tmp_path)
    server = await Receiver().start(tls=authority.server)
    try:
        monkeypatch.delenv("SSL_CERT_FILE", raising=False)
        untrusting = OutboundClient(LOOPBACK_ONLY)
        try:
            with pytest.raises(OutboundFailed, match="connection failed"):
                await untrusting.request("GET", server.url, timeout=2)
        finally:
            await untrusting.aclose()
        monkeypatch.setenv("SSL_CERT_FILE", str(authority.ca_file))
        trusting = OutboundClient(LOOPBACK_ONLY)
        try:
            response = await trusting.request("GET", server.url, timeout=2)
        finally:
            await trusting.aclose()
    finally:
        await server.close()
    assert response.status_code == 200 and len(server.requests) == 1


def test_the_allow_list_reads_names_addresses_in_any_spelling_and_ranges() -> None:
    policy = OutboundPolicy.parse(
        " LocalHost. , vllm.internal,2130706433,[::1],10.0.0.0/8,[fd00::]/8"
    )
    assert policy.hosts == {"localhost", "vllm.internal"}
    assert {str(network) for network in policy.networks} == {
        "127.0.0.1/32",
        "::1/128",
        "10.0.0.0/8",
        "fd00::/8",
    }
    # A name allows only itself: no subdomain, no wildcard.
    assert policy.allows_host("VLLM.internal.")
    assert not policy.allows_host("gpu.vllm.internal")
    # An allowed IPv4 address is allowed in its IPv4-mapped IPv6 form, as a socket reaches it.
    assert policy.allows_address(ipaddress.ip_address("::ffff:10.1.2.3"))


@pytest.mark.parametrize(
    "entry", ["localhost:8000", "http://vllm", "*.corp", "10.0.0.0/33", "vllm host", "bücher.de"]
)
def test_an_allow_list_entry_that_is_no_name_address_or_range_is_refused(entry: str) -> None:
    with pytest.raises(ValueError, match="is not a host name, an address or a CIDR range"):
        OutboundPolicy.parse(f"127.0.0.1,{entry}")


@pytest.mark.parametrize(
    ("allowed", "refused"),
    [
        ("", True),
        ("localhost", False),
        ("127.0.0.0/8", False),
        ("::1", False),
        ("10.0.0.0/8", True),
    ],
)
def test_a_localhost_name_counts_as_loopback_whatever_it_resolves_to(
    allowed: str, refused: bool
) -> None:
    policy = OutboundPolicy.parse(allowed)
    for name in ("localhost", "LOCALHOST.", "api.localhost"):
        if refused or (name == "api.localhost" and allowed == "localhost"):
            with pytest.raises(ForbiddenDestination, match="a loopback name"):
                policy.check_host(name)
        else:
            assert policy.check_host(name) is None


@pytest.mark.parametrize(
    "host",
    [
        "%31%32%37.0.0.1",
        "127.0.0.1%2e",
        " api.example.com",
        "127\u30020\u30020\u30021",
        "-x.example",
        "a..b",
    ],
)
def test_a_host_that_is_no_plain_ascii_name_is_refused_before_any_lookup(host: str) -> None:
    with pytest.raises(ForbiddenDestination, match="not a host name"):
        OutboundPolicy.parse("0.0.0.0/0").check_host(host)


def test_an_international_name_is_accepted_in_its_xn_form_only() -> None:
    policy = OutboundPolicy()
    assert policy.check_url("https://xn--bcher-kva.example/v1").host == "bücher.example"
    with pytest.raises(ForbiddenDestination, match="in its xn-- form"):
        policy.check_url("https://bücher.example/v1")

"""Provider calls reach only addresses the outbound policy allows, checked on save and on connect.

A counting listener on loopback stands for an internal service: a refused call must open no
connection to it at all, so no request (and no Authorization header) ever leaves.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
import orjson
import pytest

from app.core import outbound
from app.credentials.entities import StoredCredential
from app.main import create_app
from app.storage.memory import MemoryStorage
from tests.fakes import RecordingQueue
from tests.gateway.conftest import ADMIN, chat, gateway_settings

SECRET = "sk-ssrf-secret-must-never-leave-7781"
COMPLETION = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "up",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}


@dataclass
class Listener:
    """Counts connections and requests; answers a completion, a stream, or a redirect."""

    redirect_to: str | None = None
    connections: int = 0
    authorizations: list[str] = field(default_factory=list)
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (line.partition(":") for line in lines[1:] if line)
                }
                body = orjson.loads(await reader.readexactly(int(headers["content-length"])))
                if "authorization" in headers:
                    self.authorizations.append(headers["authorization"])
                writer.write(self._answer(bool(body.get("stream"))))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def _answer(self, stream: bool) -> bytes:
        if self.redirect_to is not None:
            return (
                f"HTTP/1.1 307 Temporary Redirect\r\nlocation: {self.redirect_to}\r\n"
                "content-length: 0\r\n\r\n"
            ).encode()
        if not stream:
            payload = orjson.dumps(COMPLETION)
            return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n" + (
                b"content-length: %d\r\n\r\n%s" % (len(payload), payload)
            )
        chunk = {**COMPLETION, "object": "chat.completion.chunk"}
        chunk["choices"] = [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]
        events = b"data: " + orjson.dumps(chunk) + b"\n\ndata: [DONE]\n\n"
        return (
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(events), events)
        )


@asynccontextmanager
async def listening(redirect_to: str | None = None) -> AsyncIterator[Listener]:
    listener = Listener(redirect_to=redirect_to)
    server = await asyncio.start_server(listener.handle, "127.0.0.1", 0)
    listener.port = server.sockets[0].getsockname()[1]
    try:
        yield listener
    finally:
        server.close()


@asynccontextmanager
async def gateway(
    allowed: str = "", storage: MemoryStorage | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    storage = storage or MemoryStorage()
    settings = gateway_settings(OUTBOUND_ALLOWED_HOSTS=allowed)
    application = create_app(settings, storage=storage, queue=RecordingQueue(storage))
    async with (
        application.router.lifespan_context(application),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=application),
            base_url="http://gateway",
            headers={"Authorization": f"Bearer {ADMIN}"},
        ) as client,
    ):
        yield client


async def add_model(
    client: httpx.AsyncClient, endpoint: str, *, provider: str = "openai", kind: str = "chat"
) -> None:
    created = await client.post(
        "/admin/credentials",
        json={"id": "self-hosted", "provider": provider, "secret": SECRET, "endpoint": endpoint},
    )
    assert created.status_code == 201, created.text
    model = {
        "id": "m",
        "provider": provider,
        "provider_model": "up",
        "credential_id": "self-hosted",
        "kind": kind,
    }
    assert (await client.post("/admin/models", json=model)).status_code == 201


async def call(client: httpx.AsyncClient, *, stream: bool) -> httpx.Response:
    return await client.post("/v1/chat/completions", json=chat("m", stream=stream))


INTERNAL = [
    "http://127.0.0.1:{port}",
    "http://[::1]:{port}",
    "http://2130706433:{port}",
    "http://0x7f.0.0.1:{port}",
    "http://169.254.169.254",
    "http://10.0.0.1",
]


@pytest.mark.parametrize("url", INTERNAL)
async def test_a_credential_endpoint_at_an_internal_address_is_refused_on_save(url: str) -> None:
    async with listening() as listener, gateway() as client:
        endpoint = url.format(port=listener.port)
        created = await client.post(
            "/admin/credentials",
            json={"id": "c", "provider": "openai", "secret": SECRET, "endpoint": endpoint},
        )
        assert created.status_code == 400, created.text
        assert created.json()["error"]["param"] == "endpoint"
        assert "refusing to call" in created.json()["error"]["message"]
        public = {"id": "c", "provider": "openai", "endpoint": "https://api.example.com/v1"}
        assert (await client.post("/admin/credentials", json=public)).status_code == 201
        changed = await client.patch("/admin/credentials/c", json={"endpoint": endpoint})
        assert changed.status_code == 400, changed.text
        assert changed.json()["error"]["param"] == "endpoint"
    assert listener.connections == 0


@pytest.mark.parametrize("url", INTERNAL)
async def test_a_model_base_url_at_an_internal_address_is_refused_on_save(url: str) -> None:
    async with listening() as listener, gateway() as client:
        base_url = url.format(port=listener.port)
        credential = {"id": "c", "provider": "custom", "endpoint": "https://api.example.com/v1"}
        assert (await client.post("/admin/credentials", json=credential)).status_code == 201
        model = {"id": "m", "provider": "custom", "provider_model": "up", "credential_id": "c"}
        created = await client.post(
            "/admin/models", json={**model, "parameters": {"base_url": base_url}}
        )
        assert created.status_code == 400, created.text
        assert created.json()["error"]["param"] == "parameters.base_url"
        public = {**model, "parameters": {"base_url": "https://api.example.com/v1"}}
        assert (await client.post("/admin/models", json=public)).status_code == 201
        changed = await client.patch("/admin/models/m", json={"parameters": {"base_url": base_url}})
        assert changed.status_code == 400, changed.text
        assert changed.json()["error"]["param"] == "parameters.base_url"
    assert listener.connections == 0


@pytest.mark.parametrize("allowed", ["127.0.0.1,::1", "localhost"])
@pytest.mark.parametrize("stream", [False, True], ids=["chat", "stream"])
async def test_an_allowed_loopback_provider_is_called(allowed: str, stream: bool) -> None:
    async with listening() as listener, gateway(allowed) as client:
        await add_model(client, f"http://localhost:{listener.port}/v1")
        answer = await call(client, stream=stream)
        assert answer.status_code == 200, answer.text
        assert "hi" in answer.text
    assert listener.connections >= 1
    assert listener.authorizations == [f"Bearer {SECRET}"]


@pytest.mark.parametrize("stream", [False, True], ids=["chat", "stream"])
async def test_a_redirect_from_a_provider_is_not_followed(stream: bool) -> None:
    # Loopback is allowed here: only not following keeps the call from reaching the target.
    async with listening() as target:
        redirect = f"http://127.0.0.1:{target.port}/v1/chat/completions"
        async with (
            listening(redirect_to=redirect) as redirector,
            gateway("127.0.0.1,::1") as client,
        ):
            await add_model(client, f"http://localhost:{redirector.port}/v1")
            answer = await call(client, stream=stream)
            assert answer.status_code == 502, answer.text
            assert "HTTP 307" in answer.json()["error"]["message"]
            assert "does not follow" in answer.json()["error"]["message"]
        assert redirector.connections >= 1
    assert target.connections == 0


# ---- spellings an attacker would try, refused on save ------------------------------------

SPELLINGS = [
    # Names that always mean loopback (RFC 6761), whatever the resolver says.
    "http://localhost:{port}",
    "http://LOCALHOST.:{port}",
    "http://api.localhost:{port}",
    # Addresses in the forms a C resolver accepts, and IPv6 views of IPv4 loopback.
    "http://127.1:{port}",
    "http://0177.0.0.1:{port}",
    "http://127.0.0.1.:{port}",
    "http://0.0.0.0:{port}",
    "http://0:{port}",
    "http://[::ffff:127.0.0.1]:{port}",
    "http://[::ffff:7f00:1]:{port}",
    "http://[0:0:0:0:0:0:0:1]:{port}",
    "http://[::]:{port}",
    "http://[fe80::1%25lo]:{port}",
    "http://[fd12:3456::1]:{port}",
    "http://[::ffff:169.254.169.254]",
    "http://metadata.google.internal.",
    # Userinfo that makes a public name look like the host.
    "http://api.example.com@127.0.0.1:{port}",
    # Hosts that are no host name: percent-encoded, spaced, non-ASCII look-alikes.
    "http://%31%32%37.0.0.1:{port}",
    "http://127.0.0.1%2e:{port}",
    "http://api.example.com%40127.0.0.1:{port}",
    "http://%20127.0.0.1:{port}",
    "http://127\u30020\u30020\u30021:{port}",
    "http://\u24dbocalhost:{port}",
    "http://xn--localhost-:{port}",
    # A port no socket has.
    "http://api.example.com:99999",
]


def _field_of(target: str) -> str:
    return {"credential": "endpoint", "model": "parameters.base_url", "webhook": "url"}[target]


async def _save(client: httpx.AsyncClient, target: str, url: str) -> httpx.Response:
    if target == "credential":
        body = {"id": "c", "provider": "openai", "secret": SECRET, "endpoint": url}
        return await client.post("/admin/credentials", json=body)
    if target == "model":
        credential = {"id": "mc", "provider": "openai", "endpoint": "https://api.example.com/v1"}
        assert (await client.post("/admin/credentials", json=credential)).status_code == 201
        model = {"id": "m", "provider": "openai", "provider_model": "up", "credential_id": "mc"}
        return await client.post("/admin/models", json={**model, "parameters": {"base_url": url}})
    return await client.post("/admin/webhooks", json={"url": url})


@pytest.mark.parametrize("target", ["credential", "model", "webhook"])
@pytest.mark.parametrize("url", SPELLINGS)
async def test_every_spelling_of_an_internal_or_unusable_host_is_refused_on_save(
    url: str, target: str
) -> None:
    async with listening() as listener, gateway() as client:
        saved = await _save(client, target, url.format(port=listener.port))
        assert saved.status_code == 400, saved.text
        assert saved.json()["error"]["param"] == _field_of(target)
    assert listener.connections == 0


@pytest.mark.parametrize("target", ["credential", "model", "webhook"])
async def test_a_localhost_name_is_saved_once_loopback_is_allowed(target: str) -> None:
    async with gateway("127.0.0.1,::1") as client:
        saved = await _save(client, target, "http://localhost:8000/v1")
        assert saved.status_code == 201, saved.text


# ---- what is checked when a connection opens ---------------------------------------------


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Names this test's DNS answers (others do not resolve); every lookup is recorded under
    the key `"lookups"`."""
    answers: dict[str, list[str]] = {"lookups": []}

    async def lookup(host: str, port: int) -> list[str]:
        answers["lookups"].append(host)
        found = answers.get(host)
        if not found:
            raise socket.gaierror(socket.EAI_NONAME, f"{host} is unknown here")
        return found

    monkeypatch.setattr(outbound, "system_resolver", lookup)
    return answers


@pytest.mark.parametrize("stream", [False, True], ids=["chat", "stream"])
async def test_a_name_the_dns_points_at_loopback_is_refused_when_connecting(
    stream: bool, resolver: dict[str, list[str]]
) -> None:
    resolver["provider.test"] = ["127.0.0.1"]
    async with listening() as listener, gateway() as client:
        await add_model(client, f"http://provider.test:{listener.port}/v1")
        answer = await call(client, stream=stream)
        assert answer.status_code == 503, answer.text
        assert "refusing to call provider.test (127.0.0.1)" in answer.json()["error"]["message"]
        assert SECRET not in answer.text
    assert resolver["lookups"] == ["provider.test"]
    assert listener.connections == 0


@pytest.mark.parametrize("stream", [False, True], ids=["chat", "stream"])
async def test_the_connection_goes_to_the_address_that_was_checked(
    stream: bool, resolver: dict[str, list[str]]
) -> None:
    # The only answer is an allowed one, and no other resolver knows the name: the call can only
    # succeed by connecting to the very address that was checked.
    resolver["provider.test"] = ["127.0.0.1"]
    async with listening() as listener, gateway("127.0.0.1") as client:
        await add_model(client, f"http://provider.test:{listener.port}/v1")
        answer = await call(client, stream=stream)
        assert answer.status_code == 200, answer.text
    assert resolver["lookups"] == ["provider.test"]
    assert listener.authorizations == [f"Bearer {SECRET}"]


@pytest.mark.parametrize(
    ("provider", "kind", "path", "body"),
    [
        ("anthropic", "chat", "/v1/chat/completions", chat("m")),
        ("anthropic", "chat", "/v1/chat/completions", chat("m", stream=True)),
        ("azure_openai", "chat", "/v1/chat/completions", chat("m")),
        ("azure_openai", "chat", "/v1/chat/completions", chat("m", stream=True)),
        ("openai", "embedding", "/v1/embeddings", {"model": "m", "input": "hello"}),
    ],
    ids=["anthropic", "anthropic-stream", "azure", "azure-stream", "embeddings"],
)
async def test_every_provider_and_path_refuses_an_internal_answer_when_connecting(
    provider: str, kind: str, path: str, body: dict[str, object], resolver: dict[str, list[str]]
) -> None:
    resolver["provider.test"] = ["10.1.2.3", "127.0.0.1"]
    async with listening() as listener, gateway() as client:
        await add_model(
            client, f"http://provider.test:{listener.port}", provider=provider, kind=kind
        )
        answer = await client.post(path, json=body)
        assert answer.status_code == 503, answer.text
        assert "refusing to call provider.test" in answer.json()["error"]["message"]
    assert listener.connections == 0


async def test_the_credential_test_refuses_an_internal_answer_when_connecting(
    resolver: dict[str, list[str]],
) -> None:
    resolver["provider.test"] = ["127.0.0.1"]
    async with listening() as listener, gateway() as client:
        await add_model(client, f"http://provider.test:{listener.port}/v1")
        tested = await client.post("/admin/credentials/self-hosted/test")
        assert tested.status_code == 200, tested.text
        assert tested.json()["ok"] is False
        assert "refusing to call provider.test (127.0.0.1)" in tested.json()["error"]
    assert listener.connections == 0


@pytest.mark.parametrize("stream", [False, True], ids=["chat", "stream"])
async def test_an_endpoint_stored_before_the_check_is_read_as_the_client_reads_it(
    stream: bool,
) -> None:
    # Stored before save-time checks existed: ideographic full stops, which the stream
    # client's URL parser reads as dots, so the host is the literal 127.0.0.1 to it.
    storage = MemoryStorage()
    async with listening() as listener, gateway(storage=storage) as client:
        await add_model(client, "https://api.example.com/v1")
        async with storage.unit_of_work() as uow:
            repo = uow.repo(StoredCredential)
            credential = await repo.get("self-hosted")
            assert credential is not None
            credential.endpoint = f"http://127\u30020\u30020\u30021:{listener.port}/v1"
            await repo.update(credential)
            await uow.commit()
        await client.post("/admin/credentials/self-hosted/test")  # drops the cached route
        await asyncio.sleep(0)
        answer = await call(client, stream=stream)
        assert answer.status_code == 503, answer.text
    assert listener.connections == 0


# ---- through an operator's proxy -----------------------------------------------------------


@pytest.fixture
def through_proxy(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No proxy setting of the machine running the tests leaks in; the test sets its own."""
    for name in list(os.environ):
        if name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)
    monkeypatch.delenv("REQUEST_METHOD", raising=False)
    return monkeypatch


@pytest.mark.parametrize("stream", [False, True], ids=["chat", "stream"])
async def test_through_a_proxy_a_name_resolving_to_an_internal_address_is_refused(
    stream: bool, through_proxy: pytest.MonkeyPatch, resolver: dict[str, list[str]]
) -> None:
    # The listener plays the proxy (it answers whatever it is asked): nothing may reach it for a
    # name whose addresses are internal, since the proxy would go there for us.
    resolver["metadata.attacker.test"] = ["169.254.169.254"]
    async with listening() as proxy:
        through_proxy.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
        async with gateway() as client:
            await add_model(client, "http://metadata.attacker.test/v1")
            answer = await call(client, stream=stream)
            assert answer.status_code == 503, answer.text
            message = answer.json()["error"]["message"]
            assert "refusing to call metadata.attacker.test (169.254.169.254)" in message
    assert proxy.connections == 0


@pytest.mark.parametrize("stream", [False, True], ids=["chat", "stream"])
@pytest.mark.parametrize("answers", [["93.184.215.14"], []], ids=["public", "unknown-here"])
async def test_through_a_proxy_a_public_name_or_one_only_the_proxy_knows_goes_through(
    stream: bool,
    answers: list[str],
    through_proxy: pytest.MonkeyPatch,
    resolver: dict[str, list[str]],
) -> None:
    resolver["api.provider.test"] = answers
    async with listening() as proxy:
        through_proxy.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
        async with gateway() as client:
            await add_model(client, "http://api.provider.test/v1")
            answer = await call(client, stream=stream)
            assert answer.status_code == 200, answer.text
    assert resolver["lookups"] == ["api.provider.test"]
    assert proxy.authorizations == [f"Bearer {SECRET}"]

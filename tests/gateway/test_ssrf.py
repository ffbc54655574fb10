"""Provider calls reach only addresses the outbound policy allows, checked on save and on connect.

A counting listener on loopback stands for an internal service: a refused call must open no
connection to it at all, so no request (and no Authorization header) ever leaves.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
import orjson
import pytest

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
async def gateway(allowed: str = "") -> AsyncIterator[httpx.AsyncClient]:
    storage = MemoryStorage()
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


async def add_model(client: httpx.AsyncClient, endpoint: str) -> None:
    created = await client.post(
        "/admin/credentials",
        json={"id": "self-hosted", "provider": "openai", "secret": SECRET, "endpoint": endpoint},
    )
    assert created.status_code == 201, created.text
    model = {
        "id": "m",
        "provider": "openai",
        "provider_model": "up",
        "credential_id": "self-hosted",
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


@pytest.mark.parametrize("stream", [False, True], ids=["chat", "stream"])
async def test_a_name_resolving_to_loopback_is_refused_when_connecting(stream: bool) -> None:
    async with listening() as listener, gateway() as client:
        await add_model(client, f"http://localhost:{listener.port}/v1")
        answer = await call(client, stream=stream)
        assert answer.status_code == 503, answer.text
        message = answer.json()["error"]["message"]
        assert "refusing to call localhost" in message
        assert "loopback" in message
        assert "OUTBOUND_ALLOWED_HOSTS" in message
        assert SECRET not in answer.text
    assert listener.connections == 0
    assert listener.authorizations == []


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

"""A real HTTP upstream on loopback: OpenAI, Azure OpenAI and Anthropic, with scripted faults."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web


@dataclass
class Fault:
    """What the next request for a model gets instead of (or before) a normal answer."""

    status: int = 200
    delay: float = 0.0
    message: str = "scripted failure"
    # For streams: fail after this many content chunks, as an in-stream error event.
    error_after_chunks: int | None = None


@dataclass
class Seen:
    model: str
    path: str
    headers: dict[str, str]
    query: dict[str, str]
    body: dict[str, Any]


@dataclass
class FakeUpstream:
    """Answers from the last user message; `plan` queues faults per upstream model name."""

    port: int = 0
    plan: dict[str, deque[Fault]] = field(default_factory=dict)
    delays: dict[str, float] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    disconnects: list[str] = field(default_factory=list)
    word_delay: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fail(self, model: str, *faults: Fault) -> None:
        self.plan.setdefault(model, deque()).extend(faults)

    def calls(self, model: str) -> int:
        return sum(1 for s in self.seen if s.model == model)

    def reset(self) -> None:
        self.plan.clear()
        self.delays.clear()
        self.seen.clear()
        self.disconnects.clear()
        self.word_delay = 0.0

    # --- helpers ---------------------------------------------------------------------------

    async def _take(self, request: web.Request, model: str) -> tuple[Fault | None, dict[str, Any]]:
        body = orjson.loads(await request.read())
        self.seen.append(
            Seen(model, request.path, dict(request.headers), dict(request.query), body)
        )
        queue = self.plan.get(model)
        fault = queue.popleft() if queue else None
        delay = (fault.delay if fault else 0.0) + self.delays.get(model, 0.0)
        if delay:
            await asyncio.sleep(delay)
        return fault, body

    @staticmethod
    def _reply(body: dict[str, Any]) -> str:
        for message in reversed(body.get("messages") or []):
            if message.get("role") == "user":
                content = message.get("content")
                if isinstance(content, list):
                    content = " ".join(p.get("text", "") for p in content)
                return f"echo: {content}"
        return "echo"

    @staticmethod
    def _openai_error(fault: Fault) -> web.Response:
        body = {"error": {"message": fault.message, "type": "x", "param": None, "code": None}}
        headers = {"retry-after": "0"} if fault.status == 429 else None
        return web.json_response(body, status=fault.status, headers=headers)

    # --- OpenAI and Azure -------------------------------------------------------------------

    async def openai_chat(self, request: web.Request) -> web.StreamResponse:
        model = request.match_info.get("deployment") or ""
        if not model:
            model = orjson.loads(await request.read()).get("model", "")
        fault, body = await self._take(request, model)
        if fault is not None and fault.status >= 400:
            return self._openai_error(fault)
        words = self._reply(body).split()
        usage = {
            "prompt_tokens": 7,
            "completion_tokens": len(words),
            "total_tokens": 7 + len(words),
        }
        if not body.get("stream"):
            return web.json_response(
                {
                    "id": "chatcmpl-up",
                    "object": "chat.completion",
                    "created": 1,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": " ".join(words)},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": usage,
                }
            )
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            data = {
                "id": "chatcmpl-up",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            return b"data: " + orjson.dumps(data) + b"\n\n"

        try:
            await response.write(chunk({"role": "assistant", "content": ""}))
            for i, word in enumerate(words * 50 if self.word_delay else words):
                if fault is not None and fault.error_after_chunks == i:
                    error = {"error": {"message": fault.message, "type": "server_error"}}
                    await response.write(b"data: " + orjson.dumps(error) + b"\n\n")
                    return response
                if self.word_delay:
                    await asyncio.sleep(self.word_delay)
                await response.write(chunk({"content": (" " if i else "") + word}))
            await response.write(chunk({}, "stop"))
            if (body.get("stream_options") or {}).get("include_usage"):
                data = {
                    "id": "chatcmpl-up",
                    "object": "chat.completion.chunk",
                    "created": 1,
                    "model": model,
                    "choices": [],
                    "usage": usage,
                }
                await response.write(b"data: " + orjson.dumps(data) + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
        except (asyncio.CancelledError, ConnectionResetError):
            self.disconnects.append(model)
            raise
        return response

    async def openai_embeddings(self, request: web.Request) -> web.Response:
        model = request.match_info.get("deployment") or ""
        if not model:
            model = orjson.loads(await request.read()).get("model", "")
        fault, body = await self._take(request, model)
        if fault is not None and fault.status >= 400:
            return self._openai_error(fault)
        inputs = body["input"]
        data = [
            {"object": "embedding", "index": i, "embedding": [float(len(text)), 0.5, -1.0]}
            for i, text in enumerate(inputs)
        ]
        usage = {"prompt_tokens": len(inputs), "total_tokens": len(inputs)}
        return web.json_response(
            {"object": "list", "data": data[::-1], "model": model, "usage": usage}
        )

    # --- Anthropic --------------------------------------------------------------------------

    async def anthropic_messages(self, request: web.Request) -> web.StreamResponse:
        model = orjson.loads(await request.read()).get("model", "")
        fault, body = await self._take(request, model)
        if fault is not None and fault.status >= 400:
            error = {"type": "error", "error": {"type": "api_error", "message": fault.message}}
            return web.json_response(error, status=fault.status)
        text = self._reply(body)
        tools = body.get("tools")
        if not body.get("stream"):
            content: list[dict[str, Any]] = [{"type": "text", "text": text}]
            stop = "end_turn"
            if tools:
                content.append(
                    {
                        "type": "tool_use",
                        "id": "toolu_1",
                        "name": tools[0]["name"],
                        "input": {"city": "Paris"},
                    }
                )
                stop = "tool_use"
            elif body.get("max_tokens", 0) < 5:
                stop = "max_tokens"
            return web.json_response(
                {
                    "id": "msg_1",
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": content,
                    "stop_reason": stop,
                    "usage": {"input_tokens": 11, "output_tokens": 4, "cache_read_input_tokens": 2},
                }
            )
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)

        async def event(kind: str, data: dict[str, Any]) -> None:
            await response.write(
                f"event: {kind}\n".encode()
                + b"data: "
                + orjson.dumps({"type": kind, **data})
                + b"\n\n"
            )

        await event(
            "message_start",
            {
                "message": {
                    "id": "msg_2",
                    "model": model,
                    "usage": {"input_tokens": 11, "output_tokens": 1},
                }
            },
        )
        await event(
            "content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}
        )
        await event("ping", {})
        for i, word in enumerate(text.split()):
            if fault is not None and fault.error_after_chunks == i:
                await event(
                    "error", {"error": {"type": "overloaded_error", "message": "overloaded"}}
                )
                return response
            await event(
                "content_block_delta",
                {"index": 0, "delta": {"type": "text_delta", "text": (" " if i else "") + word}},
            )
        await event("content_block_stop", {"index": 0})
        await event(
            "message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 3}}
        )
        await event("message_stop", {})
        return response

    # --- serving ----------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.openai_chat)
        app.router.add_post("/v1/embeddings", self.openai_embeddings)
        app.router.add_post("/openai/deployments/{deployment}/chat/completions", self.openai_chat)
        app.router.add_post("/openai/deployments/{deployment}/embeddings", self.openai_embeddings)
        app.router.add_post("/v1/messages", self.anthropic_messages)
        return app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class UpstreamThread:
    """Runs a `FakeUpstream` on its own event loop in a daemon thread."""

    def __init__(self) -> None:
        self.upstream = FakeUpstream(port=free_port())
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._runner: web.AppRunner | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._runner = web.AppRunner(self.upstream.app(), handle_signals=False)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.upstream.port).start()
            self._ready.set()

        self._loop.run_until_complete(start())
        self._loop.run_forever()

    def start(self) -> FakeUpstream:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the fake upstream did not start")
        return self.upstream

    def stop(self) -> None:
        async def stop() -> None:
            assert self._runner is not None
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

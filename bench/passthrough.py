"""The baseline: a bare ASGI proxy forwarding each POST body to the upstream through aiohttp.

Run `python -m bench.passthrough PORT UPSTREAM_URL`.
"""

from __future__ import annotations

import sys
from typing import Any

import aiohttp
import uvicorn


def build(upstream: str) -> Any:
    session: aiohttp.ClientSession | None = None

    async def app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal session
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200))
                    await send({"type": "lifespan.startup.complete"})
                else:
                    assert session is not None
                    await session.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        assert session is not None
        async with session.post(
            upstream + scope["path"], data=body, headers={"content-type": "application/json"}
        ) as response:
            answer = await response.read()
            status = response.status
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": answer})

    return app


def main() -> None:
    port, upstream = int(sys.argv[1]), sys.argv[2]
    uvicorn.run(
        build(upstream),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        loop="uvloop",
        http="httptools",
    )


if __name__ == "__main__":
    main()

"""httpx.AsyncClient, aiohttp and the gateway's own H1Client against a raw loopback server.

Run `python -m bench.http_clients`. The upstream runs in its own process (bench.raw_upstream);
each client posts a small chat request and reads the JSON answer, through one pooled client,
at 1 and 32 connections. Besides requests/s and latency it prints the CPU time this process
spent per request (the client's cost, warm-up included), the figure that matters to a gateway
sharing its core with everything else it does per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import aiohttp
import httpx
import orjson
import uvloop

from app.gateway.providers.h1 import H1Client

BODY = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hello there"}]})
HEADERS = {"content-type": "application/json", "authorization": "Bearer bench"}
REQUESTS = {1: 2000, 32: 6000}

Call = Callable[[], Awaitable[bytes]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def run(call: Call, concurrency: int, total: int) -> tuple[float, float, float]:
    """Requests per second, p50 and p99 in milliseconds."""
    for _ in range(50):
        await call()
    latencies: list[float] = []

    async def worker(n: int) -> None:
        for _ in range(n):
            start = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(worker(total // concurrency) for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    cuts = statistics.quantiles(latencies, n=100)
    return len(latencies) / elapsed, cuts[49] * 1000, cuts[98] * 1000


async def measured(call: Call, concurrency: int, total: int) -> str:
    """`run`'s figures and the CPU time per request, as a table row's numbers."""
    began = time.process_time()
    rps, p50, p99 = await run(call, concurrency, total)
    cpu_us = (time.process_time() - began) / (total + 50) * 1e6
    return f"{concurrency:>5} {rps:>8.0f} {p50:>8.2f} {p99:>8.2f} {cpu_us:>10.0f}"


async def bench(url: str) -> None:
    print(f"{'client':<8} {'conns':>5} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'cpu us/req':>10}")
    for concurrency, total in REQUESTS.items():
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(limits=limits, timeout=10) as client:

            async def httpx_call() -> bytes:
                response = await client.post(url, content=BODY, headers=HEADERS)
                return response.content

            print(f"{'httpx':<8} {await measured(httpx_call, concurrency, total)}")
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def aiohttp_call() -> bytes:
                async with session.post(url, data=BODY, headers=HEADERS) as response:
                    return await response.read()

            print(f"{'aiohttp':<8} {await measured(aiohttp_call, concurrency, total)}")
        h1 = H1Client(max_connections=concurrency)

        async def h1_call(h1: H1Client = h1) -> bytes:
            response = await h1.post(url, HEADERS, BODY, total=10, connect_timeout=5)
            return response.body

        print(f"{'H1Client':<8} {await measured(h1_call, concurrency, total)}")
        h1.close()


def main() -> None:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.raw_upstream", str(port)], start_new_session=True
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            time.sleep(0.05)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(bench(f"http://127.0.0.1:{port}/v1/chat/completions"))
    finally:
        server.terminate()
        server.wait(5)


if __name__ == "__main__":
    main()

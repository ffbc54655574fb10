"""Latency the gateway adds over its upstream, and its throughput against a bare passthrough.

Run `python -m bench.gateway`. Three processes on loopback: a raw mock OpenAI upstream
(bench.raw_upstream), a bare async passthrough proxy (bench.passthrough) and the gateway with
one uvicorn worker (bench.gateway_server: PostgreSQL, the Redis broker, a team key with rate
limits and a budget, usage recording on). Targets: added p50 <= 1 ms, p99 <= 5 ms at one
connection; throughput >= 50 % of the passthrough at 32 connections. Every figure is taken
in three rounds and judged by its median. At the end it checks that every call left one usage
record and one execution log in the database.

`--metrics off` runs the gateway without recording any metric (`BENCH_METRICS=off`), for the
figures to compare with the default's. Tracing is off unless OTEL_EXPORTER_OTLP_ENDPOINT is set.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import time

import aiohttp
import orjson
import uvloop

from bench.gateway_server import KEY, MODEL, recorded_usage
from bench.http_clients import free_port, run

BODY = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hello there"}]})
SEQUENTIAL, CONCURRENT, CONNECTIONS = 2000, 6000, 32
ROUNDS = 3
WARM_UP = 50  # per run, see bench.http_clients.run
TARGET_P50_MS, TARGET_P99_MS, TARGET_RATIO = 1.0, 5.0, 0.5


def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", *args], start_new_session=True, env=env)


def wait_for(port: int) -> None:
    deadline = time.monotonic() + 60  # a loaded machine imports slowly
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def verdict(ok: bool) -> str:
    return "pass" if ok else "MISS"


async def measure(urls: dict[str, str]) -> int:
    """Print the figures and the verdict per target; returns how many calls the gateway got.

    The machine's speed drifts within a minute, so each figure is measured in `ROUNDS`
    rounds, the three targets taking turns within a round, and the verdicts use the medians
    (the throughput ratio: the median of each round's gateway / passthrough ratio).
    """
    headers = {"content-type": "application/json", "authorization": f"Bearer {KEY}"}
    results: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
    print(f"{'round':>5} {'target':<12} {'conns':>5} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for round_ in range(1, ROUNDS + 1):
        for concurrency, total in ((1, SEQUENTIAL), (CONNECTIONS, CONCURRENT)):
            for name, url in urls.items():
                connector = aiohttp.TCPConnector(limit=concurrency)
                async with aiohttp.ClientSession(connector=connector) as session:

                    async def call(
                        url: str = url, session: aiohttp.ClientSession = session
                    ) -> bytes:
                        async with session.post(url, data=BODY, headers=headers) as response:
                            assert response.status == 200, await response.text()
                            return await response.read()

                    figures = await run(call, concurrency, total)
                results.setdefault((name, concurrency), []).append(figures)
                rps, p50, p99 = figures
                row = f"{rps:>8.0f} {p50:>8.2f} {p99:>8.2f}"
                print(f"{round_:>5} {name:<12} {concurrency:>5} {row}")

    def median(name: str, conns: int, index: int) -> float:
        return statistics.median(figures[index] for figures in results[name, conns])

    print(f"\nmedians of {ROUNDS} rounds")
    for name, conns in results:
        rps, p50, p99 = (median(name, conns, i) for i in range(3))
        print(f"{'':>5} {name:<12} {conns:>5} {rps:>8.0f} {p50:>8.2f} {p99:>8.2f}")
    added: dict[str, tuple[float, float]] = {}
    for name in ("passthrough", "gateway"):
        added[name] = (
            median(name, 1, 1) - median("upstream", 1, 1),
            median(name, 1, 2) - median("upstream", 1, 2),
        )
        p50, p99 = added[name]
        print(f"added by {name:<12} p50 {p50:.2f} ms   p99 {p99:.2f} ms")
    ratios = [
        g[0] / p[0]
        for g, p in zip(
            results["gateway", CONNECTIONS], results["passthrough", CONNECTIONS], strict=True
        )
    ]
    ratio = statistics.median(ratios)
    shown = ", ".join(f"{r:.0%}" for r in ratios)
    print(f"gateway throughput at {CONNECTIONS} connections: {ratio:.0%} of the passthrough")
    print(f"  (per round: {shown})")
    added_p50, added_p99 = added["gateway"]
    print(f"target added p50 <= {TARGET_P50_MS} ms: {verdict(added_p50 <= TARGET_P50_MS)}")
    print(f"target added p99 <= {TARGET_P99_MS} ms: {verdict(added_p99 <= TARGET_P99_MS)}")
    print(f"target throughput >= {TARGET_RATIO:.0%}: {verdict(ratio >= TARGET_RATIO)}")
    # Every timed call plus the warm-up calls of both runs, in every round.
    return ROUNDS * (SEQUENTIAL + CONCURRENT // CONNECTIONS * CONNECTIONS + 2 * WARM_UP)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--metrics", choices=("on", "off"), default="on")
    metrics = parser.parse_args().metrics
    ports = {name: free_port() for name in ("upstream", "passthrough", "gateway")}
    upstream = f"http://127.0.0.1:{ports['upstream']}"
    tracing = "on" if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") else "off"
    print(f"metrics {metrics}, tracing {tracing}")
    print(f"load average before the run: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    subprocess.run([sys.executable, "-m", "bench.gateway_server", "prepare", upstream], check=True)
    processes = [
        start("bench.raw_upstream", str(ports["upstream"])),
        start("bench.passthrough", str(ports["passthrough"]), upstream),
        start(
            "bench.gateway_server",
            "serve",
            str(ports["gateway"]),
            env={**os.environ, "BENCH_METRICS": metrics},
        ),
    ]
    calls = 0
    try:
        for port in ports.values():
            wait_for(port)
        urls = {
            name: f"http://127.0.0.1:{port}/v1/chat/completions" for name, port in ports.items()
        }
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            calls = runner.run(measure(urls))
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(10)
    print(f"load average after the run: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    # Every answered call committed both entries before it was answered.
    records, logs = recorded_usage()
    complete = records == logs == calls
    print(f"usage records {records}, execution logs {logs} for {calls} calls: {verdict(complete)}")


if __name__ == "__main__":
    main()

"""The lean pipelined Redis client, against the real Redis server."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, NoScriptError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

from app.core.redis_pipe import PipelinedRedis


@pytest.fixture
async def direct(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    await client.flushdb()
    yield client
    await client.flushdb()
    await client.aclose()


@pytest.fixture
async def pipe(redis_url: str, direct: aioredis.Redis) -> AsyncIterator[PipelinedRedis]:
    client = PipelinedRedis(redis_url)
    yield client
    await client.aclose()


async def test_commands_reach_the_database_the_url_names(
    pipe: PipelinedRedis, direct: aioredis.Redis
) -> None:
    assert await pipe.set("greeting", "hello") is True
    assert await direct.get("greeting") == b"hello"


async def test_concurrent_commands_each_get_their_own_reply(
    pipe: PipelinedRedis, direct: aioredis.Redis
) -> None:
    replies = await asyncio.gather(*(pipe.execute_command("INCR", "n") for _ in range(300)))
    assert sorted(replies) == list(range(1, 301))
    assert int(await direct.get("n") or 0) == 300


async def test_set_with_nx_does_not_overwrite(pipe: PipelinedRedis, direct: aioredis.Redis) -> None:
    assert await pipe.set("k", 1, nx=True, ex=60) is True
    assert await pipe.set("k", 2, nx=True, ex=60) is None
    assert await direct.get("k") == b"1"
    assert 0 < await direct.ttl("k") <= 60


async def test_a_script_redis_does_not_know_is_loaded_and_run(
    pipe: PipelinedRedis, direct: aioredis.Redis
) -> None:
    # A source Redis has never seen (flushing its scripts would disturb other tests).
    unique = f"-- {uuid.uuid4()}\nreturn redis.call('INCRBY', KEYS[1], ARGV[1])"
    script = pipe.register_script(unique)
    assert await direct.script_exists(script.sha) == [False]
    assert await script(keys=["s"], args=[5]) == 5
    # Now known by its SHA1: a pipeline runs it without loading it again.
    replies = await pipe.pipeline().evalsha(script.sha, 1, "s", 2).execute()
    assert replies == [7]


async def test_a_pipeline_gives_error_replies_as_values_when_asked(pipe: PipelinedRedis) -> None:
    replies = await (
        pipe.pipeline()
        .evalsha("0" * 40, 0)
        .execute_command("INCR", "x")
        .execute_command("LPUSH", "x", "not-a-list")
        .execute(raise_on_error=False)
    )
    assert isinstance(replies[0], NoScriptError)
    assert replies[1] == 1
    assert isinstance(replies[2], ResponseError) and "WRONGTYPE" in str(replies[2])


async def test_an_error_reply_is_raised(pipe: PipelinedRedis) -> None:
    await pipe.execute_command("SET", "text", "abc")
    with pytest.raises(ResponseError, match="not an integer"):
        await pipe.execute_command("INCR", "text")
    assert await pipe.execute_command("GET", "text") == b"abc"  # the connection still serves


async def test_a_caller_that_stops_waiting_does_not_shift_the_replies(
    pipe: PipelinedRedis,
) -> None:
    blocked = asyncio.ensure_future(pipe.execute_command("BLPOP", "nothing", "0.3"))
    await asyncio.sleep(0.05)
    blocked.cancel()
    # Sent after the cancelled command: its reply is its own, not the BLPOP's nil.
    assert await asyncio.wait_for(pipe.execute_command("ECHO", "mine"), 2) == b"mine"


async def test_a_killed_connection_fails_its_commands_and_the_next_one_reconnects(
    pipe: PipelinedRedis, direct: aioredis.Redis
) -> None:
    await pipe.execute_command("CLIENT", "SETNAME", "pipelined-under-test")
    waiting = asyncio.ensure_future(pipe.execute_command("BLPOP", "nothing", "5"))
    await asyncio.sleep(0.05)
    clients = await direct.client_list()
    (victim,) = [c["id"] for c in clients if c.get("name") == "pipelined-under-test"]
    await direct.client_kill_filter(_id=victim)
    with pytest.raises(RedisConnectionError):
        await asyncio.wait_for(waiting, 2)
    assert await pipe.execute_command("PING") == b"PONG"


async def test_nothing_listening_is_a_connection_error() -> None:
    client = PipelinedRedis("redis://127.0.0.1:1/0", connect_timeout=1.0)
    with pytest.raises(RedisConnectionError):
        await client.execute_command("PING")


async def test_a_password_the_server_refuses_is_an_authentication_error(redis_url: str) -> None:
    host = redis_url.split("//", 1)[1]
    client = PipelinedRedis(f"redis://:wrong-password@{host}")
    with pytest.raises(AuthenticationError):
        await client.execute_command("PING")
    await client.aclose()


async def test_a_connection_lost_after_its_first_caller_went_away_is_made_again(
    pipe: PipelinedRedis, direct: aioredis.Redis
) -> None:
    first = asyncio.ensure_future(pipe.execute_command("PING"))
    await asyncio.sleep(0)  # connecting
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    await asyncio.sleep(0.1)  # the connection was made all the same
    await pipe.execute_command("CLIENT", "SETNAME", "pipelined-first-gone")
    clients = await direct.client_list()
    (victim,) = [c["id"] for c in clients if c.get("name") == "pipelined-first-gone"]
    await direct.client_kill_filter(_id=victim)
    await asyncio.sleep(0.1)
    assert await asyncio.wait_for(pipe.execute_command("PING"), 2) == b"PONG"


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def loopback_server(handler: Handler) -> AsyncIterator[int]:
    """A hand-written server on a free loopback port (yields the port), closed on exit."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def test_a_server_that_never_answers_the_set_up_is_left_closed() -> None:
    closed = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(-1)  # reads AUTH and SELECT, answers nothing, until the client leaves
        closed.set()

    async with loopback_server(silent) as port:
        client = PipelinedRedis(f"redis://:secret@127.0.0.1:{port}/3", connect_timeout=0.2)
        with pytest.raises(RedisConnectionError):
            await asyncio.wait_for(client.execute_command("PING"), 2)
        await asyncio.wait_for(closed.wait(), 2)


async def test_a_connection_that_stopped_answering_is_given_up_for_a_new_one() -> None:
    connections: list[asyncio.StreamWriter] = []

    async def first_silent_then_pong(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        connections.append(writer)
        silent = len(connections) == 1  # the first connection hangs, as a frozen server would
        while await reader.read(4096):
            if not silent:
                writer.write(b"+PONG\r\n")
        writer.close()

    async with loopback_server(first_silent_then_pong) as port:
        client = PipelinedRedis(f"redis://127.0.0.1:{port}/0", reply_timeout=0.3)
        try:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(client.execute_command("PING"), 0.1)
            # Not yet silent for `reply_timeout`: the connection is still given the benefit.
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(client.execute_command("PING"), 0.1)
            assert len(connections) == 1
            await asyncio.sleep(0.3)
            assert await asyncio.wait_for(client.execute_command("PING"), 2) == b"PONG"
            assert len(connections) == 2
        finally:
            await client.aclose()

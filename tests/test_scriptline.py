"""The hot path's pipelined script connection, against real Redis servers."""

from __future__ import annotations

import asyncio
import time

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError, ResponseError

from app.identity.sessions import Session, SessionStore, issue
from app.local.embedded import EmbeddedRedis, free_port
from app.store.scriptline import ScriptLine
from app.store.scripts import CampaignKeys, GrabCode, GrabStatus, Scripts, session_key


def _line(url: str) -> ScriptLine:
    line = ScriptLine.from_url(url)
    assert line is not None
    return line


async def test_concurrent_calls_get_their_own_replies(redis_url: str) -> None:
    line = _line(redis_url)
    try:
        replies = await asyncio.gather(*(line.call("ECHO", f"n{i}") for i in range(2_000)))
        assert replies == [f"n{i}".encode() for i in range(2_000)]
        with pytest.raises(ResponseError, match="unknown command"):
            await line.call("NO-SUCH-COMMAND")
        assert await line.call("ECHO", "after an error") == b"after an error"
    finally:
        line.close()


async def test_session_checks_go_over_the_line_and_fail_as_lost_with_it(
    private_redis_server: EmbeddedRedis,
) -> None:
    """The sessions' MGET is the line's: it answers while redis-py's client points at a
    port nobody listens on, and a Redis gone fails it with redis-py's ConnectionError
    (503 at the edge), not an answer of "no such session"."""
    line = _line(private_redis_server.url)
    nowhere = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    stats = Redis.from_url(private_redis_server.url)
    sessions = SessionStore(nowhere, 600, keys=[("k1", b"k" * 32)], line=line)
    try:
        sid, token = issue(b"k" * 32, Session("alive"), int(time.time()) + 600, "k1")
        await stats.set(session_key(sid), Session("alive").to_json(), ex=600)
        claims = await sessions.signed(token)
        assert claims is not None
        assert await sessions.confirm(claims)
        await stats.flushdb()
        assert not await sessions.confirm(claims)
        await stats.aclose()
        private_redis_server.stop()
        with pytest.raises(ConnectionError):
            await sessions.confirm(claims)
    finally:
        line.close()
        await nowhere.aclose()


async def test_settles_grabs_like_redis_py_and_reloads_flushed_scripts(
    redis: Redis, redis_url: str
) -> None:
    line = _line(redis_url)
    try:
        keys = CampaignKeys.of("line")
        await redis.hset(keys.meta, mapping={"starts_at_ms": 0, "ends_at_ms": 2**50})
        await redis.rpush(keys.pool, "0:300", "1:200")
        await redis.script_flush()  # as after a failover: the line must load it again
        result = await Scripts(redis, line).grab_envelope("line", ["a", "b", "a", "c"])
        assert result.status is GrabStatus.SETTLED
        assert result.remaining_count == 0
        assert result.outcomes == [
            (GrabCode.WON, 300),
            (GrabCode.WON, 200),
            (GrabCode.ALREADY_WON, 300),
            (GrabCode.SOLD_OUT, 0),
        ]
        assert await redis.xlen(keys.ledger) == 2
    finally:
        line.close()


async def test_lost_connection_fails_calls_then_reconnects(
    private_redis_server: EmbeddedRedis,
) -> None:
    line = _line(private_redis_server.url)
    try:
        assert await line.call("PING") == b"PONG"
        blocked = asyncio.ensure_future(line.call("BLPOP", "never", 0))
        await asyncio.sleep(0.1)
        private_redis_server.stop()
        with pytest.raises(ConnectionError):
            await blocked
        with pytest.raises(ConnectionError):
            await line.call("PING")
        private_redis_server.start()
        assert await line.call("PING") == b"PONG"
    finally:
        line.close()


async def test_a_call_on_a_connection_closing_under_it_fails_as_lost_then_reconnects(
    redis_url: str,
) -> None:
    """A master killed between the line's check of its connection and the write (or a
    write of the same call that broke it): uvloop refuses the write with RuntimeError,
    which would answer 500; the call fails as a lost connection (503) instead."""
    line = _line(redis_url)
    try:
        assert await line.call("PING") == b"PONG"
        protocol = line._protocol
        assert protocol is not None
        assert protocol.transport is not None
        protocol.transport.close()
        commands = [protocol.send(("PING",)), protocol.send(("PING",))]
        for future in commands:
            with pytest.raises(ConnectionError):
                await future
        assert await line.call("PING") == b"PONG"
    finally:
        line.close()


async def test_password_and_database_from_the_url(private_redis_server: EmbeddedRedis) -> None:
    admin = Redis.from_url(private_redis_server.url)
    await admin.config_set("requirepass", "s3cret")
    await admin.aclose()
    url = f"redis://:s3cret@127.0.0.1:{private_redis_server.port}/3"
    line = _line(url)
    try:
        assert await line.call("SET", "k", "on db 3") == b"OK"
    finally:
        line.close()
    check = Redis.from_url(url)
    try:
        assert await check.get("k") == b"on db 3"
    finally:
        await check.aclose()
    wrong = _line(f"redis://:nope@127.0.0.1:{private_redis_server.port}/0")
    try:
        with pytest.raises(ResponseError):
            await wrong.call("PING")
    finally:
        wrong.close()


def test_urls_it_does_not_speak() -> None:
    assert ScriptLine.from_url("rediss://example:6380/0") is None
    assert ScriptLine.from_url("unix:///run/redis.sock") is None


def test_reads_leave_the_line_to_redis_py_when_scripts_wait_for_replicas(redis: Redis) -> None:
    """With REDIS_WAIT_REPLICAS each script call is followed by WAIT on the line: a read
    queued behind it would wait for the replicas too."""
    assert Scripts(redis, ScriptLine("127.0.0.1", 6379, 0, None, None)).line is not None
    waiting = ScriptLine("127.0.0.1", 6379, 0, None, None, wait_replicas=1)
    assert Scripts(redis, waiting).line is None

"""One pipelined Redis connection for the hot path's script calls.

redis-py spends about 200 µs of Python per EVALSHA in a busy worker: the connection
pool and its lock, the retry wrapper, argument encoding and response callbacks. The
settlement scripts need none of that: a ScriptLine packs the command itself, writes it
on one connection shared by every batch of the worker, and hands replies back in order
(Redis answers a connection's commands in the order it received them), parsing them
with hiredis. Everything else keeps using redis-py.

A lost connection fails the calls in flight with redis-py's ConnectionError (the edge
renders 503; a script call is atomic, so a failed one settled all or nothing) and the
next call reconnects.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any
from urllib.parse import unquote

import hiredis
from redis.exceptions import ConnectionError, NoScriptError, ResponseError
from yarl import URL

Arg = bytes | str | int


def pack(args: tuple[Arg, ...]) -> bytes:
    """A RESP array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        raw = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(parts)


class _Protocol(asyncio.Protocol):
    def __init__(self, line: ScriptLine) -> None:
        self._line = line
        self._reader = hiredis.Reader()

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        waiting = self._line.waiting
        while (reply := self._reader.gets()) is not False:
            future = waiting.popleft()
            if future.done():  # its caller was cancelled
                continue
            if isinstance(reply, hiredis.ReplyError):
                message = str(reply)
                error = NoScriptError if message.startswith("NOSCRIPT") else ResponseError
                future.set_exception(error(message))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._line.lost(exc)


class ScriptLine:
    """Pipelined calls on one connection to the Redis of a ``redis://`` URL."""

    def __init__(
        self, host: str, port: int, db: int, username: str | None, password: str | None
    ) -> None:
        self._host, self._port, self._db = host, port, db
        self._username, self._password = username, password
        self._transport: asyncio.Transport | None = None
        self._connecting: asyncio.Future[asyncio.Transport] | None = None
        self.waiting: collections.deque[asyncio.Future[Any]] = collections.deque()

    @classmethod
    def from_url(cls, url: str) -> ScriptLine | None:
        """A line to the Redis of ``url``; None for what it does not speak (TLS, sockets)."""
        parsed = URL(url)
        if parsed.scheme != "redis" or not parsed.host:
            return None
        path = parsed.path.strip("/")
        db = int(path) if path else int(parsed.query.get("db", "0"))
        return cls(
            parsed.host,
            parsed.port or 6379,
            db,
            unquote(parsed.raw_user) if parsed.raw_user else None,
            unquote(parsed.raw_password) if parsed.raw_password else None,
        )

    async def call(self, *args: Arg) -> Any:
        """Send one command and wait for its reply."""
        transport = self._transport
        if transport is None or transport.is_closing():
            transport = await self._connect()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.waiting.append(future)
        transport.write(pack(args))
        return await future

    async def evalsha(self, sha: str, script: str, keys: list[str], args: list[Arg]) -> Any:
        """EVALSHA, loading ``script`` once if Redis has lost it (restart, failover)."""
        command = ("EVALSHA", sha, len(keys), *keys, *args)
        try:
            return await self.call(*command)
        except NoScriptError:
            await self.call("SCRIPT", "LOAD", script)
            return await self.call(*command)

    async def _connect(self) -> asyncio.Transport:
        # Concurrent callers share one connection attempt.
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
            self._connecting.add_done_callback(self._connected)
        return await asyncio.shield(self._connecting)

    def _connected(self, attempt: asyncio.Future[asyncio.Transport]) -> None:
        self._connecting = None
        if not attempt.cancelled() and attempt.exception() is None:
            self._transport = attempt.result()

    async def _open(self) -> asyncio.Transport:
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_connection(
                lambda: _Protocol(self), self._host, self._port
            )
        except OSError as exc:
            raise ConnectionError(
                f"cannot reach Redis at {self._host}:{self._port}: {exc}"
            ) from exc
        setup: list[tuple[Arg, ...]] = []
        if self._password is not None:
            auth: tuple[Arg, ...] = ("AUTH", self._password)
            setup.append(
                auth if self._username is None else ("AUTH", self._username, self._password)
            )
        if self._db:
            setup.append(("SELECT", self._db))
        for command in setup:
            future: asyncio.Future[Any] = loop.create_future()
            self.waiting.append(future)
            transport.write(pack(command))
            try:
                await future
            except BaseException:
                transport.close()
                raise
        return transport

    def lost(self, exc: Exception | None) -> None:
        """The connection closed: fail every call still waiting for a reply."""
        self._transport = None
        error = ConnectionError(f"connection to Redis lost: {exc!r}")
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)

    def close(self) -> None:
        """Close the connection (shutdown)."""
        if self._transport is not None:
            self._transport.close()
            self._transport = None

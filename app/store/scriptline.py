"""One pipelined Redis connection for the hot path's script calls.

redis-py spends about 200 µs of Python per EVALSHA in a busy worker: the connection
pool and its lock, the retry wrapper, argument encoding and response callbacks. The
settlement scripts need none of that: a ScriptLine packs the command itself, writes it
on one connection shared by every batch of the worker, and hands replies back in order
(Redis answers a connection's commands in the order it received them), parsing them
with hiredis. The hot path's two reads on a single Redis go on it too: the sessions'
MGET and the winners' HMGET of a sold-out pool. Everything else keeps using redis-py.

A lost connection fails the calls in flight with redis-py's ConnectionError (the edge
renders 503; a script call is atomic, so a failed one settled all or nothing) and the
next call reconnects. Every wait is bounded by ``timeout_s`` (REDIS_TIMEOUT_MS): a
connection attempt, and each reply. A Redis that goes silent without closing (a failover
where the old primary just disappears) is noticed by a watchdog: once the oldest call
has waited ``timeout_s``, the connection is aborted, every call on it fails with
redis-py's TimeoutError, and the next call opens a new one. TCP keepalive notices a
peer that vanished while the line was idle.

With ``wait_replicas`` N > 0 every script call is followed, on the same connection and
in the same write, by ``WAIT N``: its reply is handed back only once N replicas have
acknowledged everything the call wrote, and a call whose WAIT fell short fails with
``NotReplicated`` (503: the player retries, and a grant that did settle answers
``already_won``). A master that dies after answering cannot take such a grant with it.

On a Redis Cluster, ``ClusterLine`` keeps one ScriptLine per master and the slot map:
each call goes to the master of its keys' slot (all keys of one script share a hash
tag), follows ``MOVED`` (and reloads the map) and ``ASK`` (ASKING then the call, on
one connection), and reloads the map when a master's connection fails or the cluster
says CLUSTERDOWN/TRYAGAIN, so calls on a failed master's slots reach its promoted
replica as soon as the cluster has promoted it. NOSCRIPT is answered per node.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import time
from typing import Any, cast
from urllib.parse import unquote

import hiredis
from redis.crc import key_slot
from redis.exceptions import ConnectionError, NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from yarl import URL

Arg = bytes | str | int

DEFAULT_TIMEOUT_S = 2.0
# Keepalive probes after this many idle seconds, then every interval, so many times.
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT = 5, 2, 3


class NotReplicated(RedisError):
    """WAIT answered fewer replicas than REDIS_WAIT_REPLICAS: the call is not acknowledged."""


def keepalive_options() -> dict[int, int]:
    """TCP keepalive tuning (Linux option numbers), as redis-py's socket_keepalive_options."""
    options: dict[int, int] = {}
    for name, value in (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE_S),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
        ("TCP_KEEPCNT", KEEPALIVE_COUNT),
    ):
        if hasattr(socket, name):
            options[getattr(socket, name)] = value
    return options


def pack(args: tuple[Arg, ...]) -> bytes:
    """A RESP array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        raw = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(parts)


class _Protocol(asyncio.Protocol):
    """One connection's calls awaiting replies, oldest first, with when each was sent."""

    def __init__(self, line: ScriptLine) -> None:
        self._line = line
        self._reader = hiredis.Reader()
        self.waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.sent_at: collections.deque[float] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.timed_out = False
        # The connection's loop, kept (see app.store.batching: get_running_loop's getpid).
        self._loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport is not an asyncio.Transport subclass, but is one.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            for option, value in keepalive_options().items():
                sock.setsockopt(socket.IPPROTO_TCP, option, value)

    def send(self, args: tuple[Arg, ...]) -> asyncio.Future[Any]:
        """Write one command; the future gets its reply, or ConnectionError if the
        connection is already closing (a master killed between the check and the write,
        or the failed write of a command sent just before in the same call: uvloop then
        refuses any write with RuntimeError)."""
        assert self.transport is not None
        future: asyncio.Future[Any] = self._loop.create_future()
        if self.transport.is_closing():
            future.set_exception(ConnectionError("connection to Redis lost while sending"))
            return future
        try:
            self.transport.write(pack(args))
        except RuntimeError as exc:
            future.set_exception(ConnectionError(f"connection to Redis lost: {exc}"))
            return future
        self.waiting.append(future)
        self.sent_at.append(time.monotonic())
        return future

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        waiting = self.waiting
        while (reply := self._reader.gets()) is not False:
            future = waiting.popleft()
            self.sent_at.popleft()
            if future.done():  # its caller was cancelled
                continue
            if isinstance(reply, hiredis.ReplyError):
                message = str(reply)
                error = NoScriptError if message.startswith("NOSCRIPT") else ResponseError
                future.set_exception(error(message))
            else:
                future.set_result(reply)

    def abort(self) -> None:
        """Give up on a connection that stopped answering."""
        self.timed_out = True
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        error: Exception = (
            RedisTimeoutError("Redis did not answer in time; connection replaced")
            if self.timed_out
            else ConnectionError(f"connection to Redis lost: {exc!r}")
        )
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)
        self.sent_at.clear()
        self._line.lost(self)


class ScriptLine:
    """Pipelined calls on one connection to the Redis of a ``redis://`` URL."""

    def __init__(
        self,
        host: str,
        port: int,
        db: int,
        username: str | None,
        password: str | None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        wait_replicas: int = 0,
    ) -> None:
        self._host, self._port, self._db = host, port, db
        self._username, self._password = username, password
        self.timeout_s = timeout_s
        self.wait_replicas = wait_replicas
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        self._watchdog: asyncio.TimerHandle | None = None

    @classmethod
    def from_url(
        cls, url: str, timeout_s: float = DEFAULT_TIMEOUT_S, wait_replicas: int = 0
    ) -> ScriptLine | None:
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
            timeout_s,
            wait_replicas,
        )

    @property
    def address(self) -> tuple[str, int]:
        """The host and port this line connects to."""
        return self._host, self._port

    @property
    def waiting(self) -> int:
        """Calls sent on the current connection and not answered yet."""
        return 0 if self._protocol is None else len(self._protocol.waiting)

    async def call(self, *args: Arg) -> Any:
        """Send one command and wait for its reply (at most about ``timeout_s``)."""
        protocol = self._protocol
        if protocol is None or protocol.transport is None or protocol.transport.is_closing():
            protocol = await self._connect()
        future = protocol.send(args)
        if self._watchdog is None:
            self._arm()
        return await future

    async def call_together(self, *commands: tuple[Arg, ...]) -> list[Any]:
        """Send ``commands`` back to back in one write (nothing else between them on the
        connection); every reply, in order, or the first error once all have answered."""
        protocol = self._protocol
        if protocol is None or protocol.transport is None or protocol.transport.is_closing():
            protocol = await self._connect()
        futures = [protocol.send(command) for command in commands]
        if self._watchdog is None:
            self._arm()
        replies = await asyncio.gather(*futures, return_exceptions=True)
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply
        return replies

    async def ping(self) -> None:
        """PING (readiness: the hot path's connection answers)."""
        await self.call("PING")

    async def evalsha(
        self, sha: str, script: str, keys: list[str], args: list[Arg], asking: bool = False
    ) -> Any:
        """EVALSHA, loading ``script`` once if Redis has lost it (restart, failover);
        ``asking``: preceded by ASKING (a cluster slot being migrated here)."""
        command = ("EVALSHA", sha, len(keys), *keys, *args)
        try:
            return await self._eval(command, asking)
        except NoScriptError:
            await self.call("SCRIPT", "LOAD", script)
            return await self._eval(command, asking)

    async def _eval(self, command: tuple[Arg, ...], asking: bool) -> Any:
        if not asking and not self.wait_replicas:
            return await self.call(*command)
        commands = [command]
        if asking:
            commands.insert(0, ("ASKING",))
        if self.wait_replicas:
            # WAIT must not outlast the watchdog, which would abort the connection.
            commands.append(("WAIT", self.wait_replicas, int(self.timeout_s * 500)))
        replies = await self.call_together(*commands)
        if self.wait_replicas and int(replies[-1]) < self.wait_replicas:
            raise NotReplicated(
                f"{int(replies[-1])} of {self.wait_replicas} replicas acknowledged in time"
            )
        return replies[1] if asking else replies[0]

    def _arm(self) -> None:
        # One timer per line, not one per call: the hot path pays nothing for the bound.
        self._watchdog = asyncio.get_running_loop().call_later(self.timeout_s / 4, self._check)

    def _check(self) -> None:
        self._watchdog = None
        protocol = self._protocol
        if protocol is None or not protocol.waiting:
            return
        if time.monotonic() - protocol.sent_at[0] >= self.timeout_s:
            protocol.abort()
            return
        self._arm()

    async def _connect(self) -> _Protocol:
        # Concurrent callers share one connection attempt.
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
            self._connecting.add_done_callback(self._connected)
        return await asyncio.shield(self._connecting)

    def _connected(self, attempt: asyncio.Future[_Protocol]) -> None:
        self._connecting = None
        if not attempt.cancelled() and attempt.exception() is None:
            self._protocol = attempt.result()

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout_s):
                _, protocol = await loop.create_connection(
                    lambda: _Protocol(self), self._host, self._port
                )
        except (OSError, TimeoutError) as exc:
            raise ConnectionError(
                f"cannot reach Redis at {self._host}:{self._port}: {exc!r}"
            ) from exc
        setup: list[tuple[Arg, ...]] = []
        if self._password is not None:
            auth: tuple[Arg, ...] = ("AUTH", self._password)
            setup.append(
                auth if self._username is None else ("AUTH", self._username, self._password)
            )
        if self._db:
            setup.append(("SELECT", self._db))
        try:
            async with asyncio.timeout(self.timeout_s):
                for command in setup:
                    await protocol.send(command)
        except TimeoutError:
            protocol.abort()
            raise RedisTimeoutError(f"Redis at {self._host}:{self._port} did not answer") from None
        except BaseException:
            protocol.abort()
            raise
        return protocol

    def lost(self, protocol: _Protocol) -> None:
        """``protocol``'s connection closed; the next call opens a new one."""
        if self._protocol is protocol:
            self._protocol = None

    def close(self) -> None:
        """Close the connection (shutdown)."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None


# Slots of a Redis Cluster; reloads of the slot map at most this often.
CLUSTER_SLOTS = 16384
RELOAD_EVERY_S = 0.05
# Redirections followed for one call before giving up (a map changing under our feet).
MAX_REDIRECTS = 5
_RELOAD_ERRORS = ("CLUSTERDOWN", "TRYAGAIN", "MASTERDOWN")


def _address(raw: bytes | str) -> tuple[str, int]:
    host, _, port = (raw.decode() if isinstance(raw, bytes) else raw).rpartition(":")
    return host, int(port)


class ClusterLine:
    """Pipelined script calls on a Redis Cluster: one ScriptLine per master, by slot."""

    def __init__(
        self,
        seed: tuple[str, int],
        username: str | None,
        password: str | None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        wait_replicas: int = 0,
    ) -> None:
        self._seed = seed
        self._username, self._password = username, password
        self.timeout_s = timeout_s
        self.wait_replicas = wait_replicas
        self._lines: dict[tuple[str, int], ScriptLine] = {}
        # Every node (masters and replicas) the last map named: whom to ask for the next.
        self._nodes: list[tuple[str, int]] = []
        # slot -> master address; empty until the first load.
        self._slots: list[tuple[str, int] | None] = []
        self._reloading: asyncio.Future[None] | None = None
        self._reloaded_at = float("-inf")
        self.reloads = 0

    @classmethod
    def from_url(
        cls, url: str, timeout_s: float = DEFAULT_TIMEOUT_S, wait_replicas: int = 0
    ) -> ClusterLine | None:
        """A line to the cluster ``url`` names a node of; None for TLS or sockets."""
        parsed = URL(url)
        if parsed.scheme != "redis" or not parsed.host:
            return None
        return cls(
            (parsed.host, parsed.port or 6379),
            unquote(parsed.raw_user) if parsed.raw_user else None,
            unquote(parsed.raw_password) if parsed.raw_password else None,
            timeout_s,
            wait_replicas,
        )

    @property
    def waiting(self) -> int:
        """Calls sent and not answered yet, on every master's connection."""
        return sum(line.waiting for line in self._lines.values())

    def served_by(self, slot: int) -> tuple[str, int] | None:
        """The master ``slot`` goes to, as the map says now (None before it is read)."""
        return self._slots[slot] if self._slots else None

    def _line(self, address: tuple[str, int]) -> ScriptLine:
        line = self._lines.get(address)
        if line is None:
            host, port = address
            line = ScriptLine(
                host, port, 0, self._username, self._password, self.timeout_s, self.wait_replicas
            )
            self._lines[address] = line
        return line

    async def _master(self, slot: int) -> ScriptLine:
        if not self._slots:
            await self.reload(force=True)
        address = self._slots[slot]
        if address is None:
            await self.reload(force=True)
            address = self._slots[slot]
            if address is None:
                raise ConnectionError(f"no Redis Cluster master serves slot {slot}")
        return self._line(address)

    async def evalsha(self, sha: str, script: str, keys: list[str], args: list[Arg]) -> Any:
        """EVALSHA on the master of ``keys``' slot, following redirections."""
        slot = key_slot(keys[0].encode())
        line = await self._master(slot)
        asking = False
        for _ in range(MAX_REDIRECTS):
            try:
                return await line.evalsha(sha, script, keys, args, asking=asking)
            except NotReplicated:
                raise
            except ResponseError as exc:
                kind, _, rest = str(exc).partition(" ")
                if kind == "MOVED":
                    address = _address(rest.split()[1])
                    self._slots[slot] = address
                    self._reload_soon()
                    line, asking = self._line(address), False
                    continue
                if kind == "ASK":
                    line, asking = self._line(_address(rest.split()[1])), True
                    continue
                if kind in _RELOAD_ERRORS:
                    self._reload_soon()
                raise
            except (ConnectionError, RedisTimeoutError):
                # A master gone (or silent): the next calls ask the cluster who serves now.
                self._reload_soon()
                raise
        raise ResponseError(f"slot {slot}: more than {MAX_REDIRECTS} redirections")

    async def ping(self) -> None:
        """PING every master (readiness: each connection of the hot path answers). A
        master that does not answer makes the map be read again: a worker out of
        rotation gets no grabs whose failures would."""
        if not self._slots:
            await self.reload(force=True)
        masters = {address for address in self._slots if address is not None}
        try:
            await asyncio.gather(*(self._line(address).ping() for address in masters))
        except RedisError:
            self._reload_soon()
            raise

    def _reload_soon(self) -> None:
        if self._reloading is None:
            task = asyncio.ensure_future(self.reload())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def reload(self, force: bool = False) -> None:
        """Read the slot map (CLUSTER SLOTS) from any node that answers; concurrent
        callers share one read, and a read is skipped within RELOAD_EVERY_S of the last."""
        if self._reloading is None:
            if not force and time.monotonic() - self._reloaded_at < RELOAD_EVERY_S:
                return
            self._reloading = asyncio.ensure_future(self._read_map())
            self._reloading.add_done_callback(self._reloaded)
        await asyncio.shield(self._reloading)

    def _reloaded(self, attempt: asyncio.Future[None]) -> None:
        self._reloading = None
        self._reloaded_at = time.monotonic()

    async def _read_map(self) -> None:
        candidates = [self._seed, *(a for a in self._nodes if a != self._seed)]
        errors: list[str] = []
        for address in candidates:
            line = self._line(address)
            try:
                reply = await line.call("CLUSTER", "SLOTS")
            except RedisError as exc:
                errors.append(f"{address[0]}:{address[1]}: {exc}")
                continue
            slots: list[tuple[str, int] | None] = [None] * CLUSTER_SLOTS
            nodes: set[tuple[str, int]] = set()
            for low, high, *served_by in reply:
                # The master first, then its replicas: [host, port, id, ...] each.
                named = [(node[0].decode() or address[0], int(node[1])) for node in served_by]
                nodes.update(named)
                for slot in range(int(low), int(high) + 1):
                    slots[slot] = named[0]
            self._slots = slots
            self._nodes = sorted(nodes)
            self.reloads += 1
            return
        raise ConnectionError(f"no Redis Cluster node answers CLUSTER SLOTS: {errors}")

    def close(self) -> None:
        """Close every master's connection (shutdown)."""
        for line in self._lines.values():
            line.close()
        self._lines.clear()

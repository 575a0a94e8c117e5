"""One multiplexed connection to a single Redis for the scripts on the decision path.

Why not redis-py's pool: every call checks a connection out of the pool (under
an asyncio.Lock since redis-py 5.3, redis/redis-py#3692), packs its arguments
with per-argument type dispatch and writes alone. Measured on this project's
2-core machines (benchmarks/redis_client.py), a reserve EVALSHA with its ~90
arguments cost ~4-6x more Python CPU through the pool than through this
connection, which was the largest single cost of a decision. redis-py has no
auto-pipelining (redis/redis-py#3767), so this module does the one thing the
pool cannot: every command submitted during one event-loop tick leaves in one
write on one connection, and the replies come back in order (a Redis
connection is FIFO). Replies are parsed by hiredis, the parser redis-py uses.

Scope: plain TCP and unix-socket connections to one Redis (auth and db from
the URL). TLS, Cluster and Sentinel keep redis-py (the store decides), as do
admin reads and WAIT, which would block the connection for everyone.

Errors are redis-py's exception classes, so the store maps them to domain
errors in one place: ConnectionError when the connection cannot be made or
is lost (every command in flight on it fails), TimeoutError when a reply is
overdue (the connection is dropped: a late reply must not be matched with
the next command), and the ResponseError family for error replies.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any, Iterable, Sequence

import hiredis
import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.connection import Connection, ConnectionPool, UnixDomainSocketConnection

__all__ = ["CLIENT_NAME", "MuxConnection", "Packed", "flatten", "pack_command"]

CLIENT_NAME = "quota-sidecar-mux"


def _encode(arg: Any) -> bytes:
    kind = type(arg)  # exact types first: this runs for every argument of every command
    if kind is str:
        return arg.encode()
    if kind is bytes:
        return arg
    if kind is int:
        return b"%d" % arg
    if isinstance(arg, bytes):
        return bytes(arg)
    if isinstance(arg, str):
        return str(arg).encode()
    if isinstance(arg, int) and not isinstance(arg, bool):
        return b"%d" % arg
    if isinstance(arg, float):
        return repr(arg).encode()
    raise TypeError(f"cannot send {type(arg).__name__} to Redis: {arg!r}")


def _bulk(arg: Any) -> bytes:
    data = _encode(arg)
    return b"$%d\r\n%s\r\n" % (len(data), data)


class Packed:
    """Consecutive arguments encoded once, for the parts of a command that repeat call after
    call (a decision's windows and prices); pack_command splices them in as they are."""

    __slots__ = ("args", "data")

    def __init__(self, args: Iterable[Any]) -> None:
        self.args = tuple(args)
        self.data = b"".join(_bulk(a) for a in self.args)


def flatten(args: Iterable[Any]) -> list[Any]:
    """``args`` with every Packed block replaced by its arguments (for redis-py)."""
    out: list[Any] = []
    for arg in args:
        if isinstance(arg, Packed):
            out.extend(arg.args)
        else:
            out.append(arg)
    return out


def pack_command(args: Iterable[Any]) -> bytes:
    """A RESP array of bulk strings."""
    count, parts = 0, []
    for arg in args:
        kind = type(arg)
        # str and int inline (_encode's first cases): a decision packs ~15 of them.
        if kind is str:
            data = arg.encode()
        elif kind is int:
            data = b"%d" % arg
        elif kind is Packed:
            count += len(arg.args)
            parts.append(arg.data)
            continue
        else:
            data = _encode(arg)
        count += 1
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"*%d\r\n" % count + b"".join(parts)


# The error replies this connection must tell apart, as redis-py's own clients raise them (its
# parser table is private API). The code is stripped from the message, as redis-py does.
_ERROR_CLASSES: dict[str, type[redis_errors.RedisError]] = {
    "NOSCRIPT": redis_errors.NoScriptError, "LOADING": redis_errors.BusyLoadingError,
    "READONLY": redis_errors.ReadOnlyError, "OOM": redis_errors.OutOfMemoryError,
    "MASTERDOWN": redis_errors.MasterDownError, "TRYAGAIN": redis_errors.TryAgainError,
    "NOAUTH": redis_errors.AuthenticationError, "WRONGPASS": redis_errors.AuthenticationError,
    "NOPERM": redis_errors.NoPermissionError, "EXECABORT": redis_errors.ExecAbortError,
}


def _as_error(reply: redis_errors.ResponseError) -> redis_errors.RedisError:
    # hiredis gives every error reply one class; the code tells NOSCRIPT, READONLY, LOADING... apart.
    text = str(reply)
    code, _, rest = text.partition(" ")
    kind = _ERROR_CLASSES.get(code)
    error = kind(rest) if kind is not None else redis_errors.ResponseError(text)
    error.status_code = code  # what redis-py 8 sets; _redis_error reads it
    return error


class _Protocol(asyncio.Protocol):
    def __init__(self, owner: MuxConnection) -> None:
        self._owner = owner
        self._reader = hiredis.Reader(encoding="utf-8", replyError=redis_errors.ResponseError,
                                      protocolError=redis_errors.InvalidResponse)

    def data_received(self, data: bytes) -> None:
        if self._owner._protocol is not self:
            return  # a connection already dropped
        self._reader.feed(data)
        pending = self._owner._pending
        while True:
            try:
                reply = self._reader.gets()
            except redis_errors.InvalidResponse as exc:
                self._owner._fail(redis_errors.ConnectionError(f"protocol error from Redis: {exc}"))
                return
            if reply is False:
                return
            if not pending:
                self._owner._fail(redis_errors.ConnectionError("a reply arrived for no command"))
                return
            future, _ = pending.popleft()
            if not future.done():  # its caller may have been cancelled
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._owner._protocol is not self:
            return
        self._owner._fail(redis_errors.ConnectionError(f"connection to Redis lost: {exc or 'closed'}"))


class MuxConnection:
    """Commands from any number of coroutines over one connection, one write per loop tick."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 6379, path: str = "", username: str | None = None,
                 password: str | None = None, db: int = 0, timeout_seconds: float = 2.0) -> None:
        assert timeout_seconds > 0
        self._address = path or f"{host}:{port}"
        self._host, self._port, self._path = host, port, path
        self._handshake = self._handshake_commands(username, password, db)
        self._timeout_seconds = timeout_seconds
        self._transport: asyncio.Transport | None = None
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None
        # (future, monotonic time submitted) in the order the commands were written.
        self._pending: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self._outgoing: list[bytes] = []
        self._flush_scheduled = False
        self._watchdog: asyncio.TimerHandle | None = None
        self._closed = False

    @classmethod
    def for_client(cls, client: Any, *, timeout_seconds: float) -> MuxConnection | None:
        """A connection to the same Redis as a plain redis-py client; None for TLS, Sentinel, Cluster."""
        pool = getattr(client, "connection_pool", None)
        if not isinstance(client, aioredis.Redis) or type(pool) is not ConnectionPool:
            return None
        kwargs = pool.connection_kwargs
        username, password, db = kwargs.get("username"), kwargs.get("password"), int(kwargs.get("db") or 0)
        if pool.connection_class is UnixDomainSocketConnection:
            return cls(path=kwargs["path"], timeout_seconds=timeout_seconds, username=username, password=password,
                       db=db)
        if pool.connection_class is Connection:
            return cls(host=kwargs.get("host", "127.0.0.1"), port=int(kwargs.get("port", 6379)),
                       timeout_seconds=timeout_seconds, username=username, password=password, db=db)
        return None

    @staticmethod
    def _handshake_commands(username: str | None, password: str | None, db: int) -> list[bytes]:
        commands = []
        if password is not None:
            commands.append(pack_command(["AUTH", username, password] if username else ["AUTH", password]))
        if db:
            commands.append(pack_command(["SELECT", db]))
        # So an operator's CLIENT LIST tells this connection apart from redis-py's.
        commands.append(pack_command(["CLIENT", "SETNAME", CLIENT_NAME]))
        return commands

    # -- sending ----------------------------------------------------------

    async def execute(self, *args: Any) -> Any:
        """One command; its reply, or the RedisError it failed with, raised."""
        reply = (await self.execute_many([pack_command(args)]))[0]
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def execute_many(self, packed: Sequence[bytes]) -> list[Any]:
        """Packed commands written together, in order; each reply or its RedisError (not raised).

        A connection that cannot be made, or is lost, raises ConnectionError; an overdue reply,
        TimeoutError."""
        await self._connect()
        return await self._exchange(packed)

    async def _exchange(self, packed: Sequence[bytes]) -> list[Any]:
        """execute_many on the connection as it is (no connecting): the connection set-up's own
        commands come through here, under the connect lock."""
        futures = [self._submit(command) for command in packed]
        results = []
        try:
            for future in futures:
                reply = await future
                results.append(_as_error(reply) if isinstance(reply, redis_errors.ResponseError) else reply)
        except BaseException:
            for future in futures:  # they failed together: mark the others' errors as seen
                if future.done() and not future.cancelled():
                    future.exception()
            raise
        return results

    def _submit(self, command: bytes) -> asyncio.Future[Any]:
        if self._transport is None or self._transport.is_closing():
            raise redis_errors.ConnectionError(f"not connected to Redis at {self._address}")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((future, time.monotonic()))
        self._outgoing.append(command)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        if self._watchdog is None:
            self._watchdog = loop.call_later(self._timeout_seconds / 4, self._check_overdue)
        return future

    def _flush(self) -> None:
        self._flush_scheduled = False
        data, self._outgoing = b"".join(self._outgoing), []
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _check_overdue(self) -> None:
        self._watchdog = None
        if not self._pending:
            return
        age_seconds = time.monotonic() - self._pending[0][1]
        if age_seconds >= self._timeout_seconds:
            self._fail(redis_errors.TimeoutError(
                f"no reply from Redis at {self._address} within {self._timeout_seconds} s"))
            return
        self._watchdog = asyncio.get_running_loop().call_later(
            max(self._timeout_seconds - age_seconds, self._timeout_seconds / 4), self._check_overdue)

    # -- connection -------------------------------------------------------

    async def _connect(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            return
        if self._closed:
            raise redis_errors.ConnectionError("connection closed")
        # Bounded: whoever holds the lock is connecting (a timeout) or waiting for the set-up's
        # replies (the overdue-reply timeout), never for the lock again (_open uses _exchange).
        self._connecting = self._connecting or asyncio.Lock()
        async with self._connecting:
            if self._transport is not None and not self._transport.is_closing():
                return
            await self._open()

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self._path:
                opening = loop.create_unix_connection(lambda: _Protocol(self), self._path)
            else:
                opening = loop.create_connection(lambda: _Protocol(self), self._host, self._port)
            transport, protocol = await asyncio.wait_for(opening, self._timeout_seconds)
        except (OSError, asyncio.TimeoutError) as exc:
            raise redis_errors.ConnectionError(f"cannot connect to Redis at {self._address}: {exc!r}") from exc
        if transport.is_closing():
            # Reset as soon as it was made (a proxy refusing, Redis at maxclients or shutting down),
            # before it was this connection's: its protocol's connection_lost was not heard.
            transport.abort()
            raise redis_errors.ConnectionError(f"connection to Redis at {self._address} lost as it was made")
        self._transport, self._protocol = transport, protocol
        self._outgoing, self._pending = [], collections.deque()
        # Not execute_many: it would wait for the connect lock this task holds, should the
        # connection be lost meanwhile (a deadlock: no call would ever connect again).
        for reply in await self._exchange(self._handshake):
            if isinstance(reply, Exception):
                self._fail(redis_errors.ConnectionError(f"Redis refused the connection set-up: {reply}"))
                raise reply

    def _fail(self, exc: redis_errors.RedisError) -> None:
        """Drops the connection; every command in flight on it fails with ``exc``."""
        transport, self._transport, self._protocol = self._transport, None, None
        pending, self._pending = self._pending, collections.deque()
        self._outgoing = []
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if transport is not None:
            transport.abort()
        for future, _ in pending:
            if not future.done():
                future.set_exception(exc)

    async def aclose(self) -> None:
        self._closed = True
        self._fail(redis_errors.ConnectionError("connection closed"))

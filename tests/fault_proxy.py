"""A small asyncio TCP proxy that injects network faults on command (tests only).

    proxy = FaultProxy("127.0.0.1", redis.port)
    await proxy.start()            # listens on 127.0.0.1:<proxy.port>
    await proxy.delay(200)         # every forwarded chunk waits 200 ms
    await proxy.cut()              # every open connection dies (RST), new ones still accepted
    await proxy.wait_for(lambda s: s.bytes_held > 0)   # a command is in the proxy, not yet sent on
    await proxy.aclose()

It sits between the sidecar and Redis so tests can make Redis look slow,
unreachable or half-dead without touching Redis itself. Faults never corrupt
the byte stream: a connection either carries its bytes in order (maybe late)
or dies (TCP never drops bytes in the middle of a live stream, and a proxy
that did so could make Redis misparse a command into another one).

Every loop in here ends with its connection: on EOF, on a cut, or on aclose().

Tests never sleep to guess where a command is: ``wait_for(predicate)`` waits (bounded) until
the proxy's counters say so, e.g. that a command sent through it is being held back by a
delay or a blackhole (``bytes_held``), or that it has been forwarded (``bytes_up``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass
from typing import Callable

_CHUNK_BYTES = 65_536
_CONNECT_TIMEOUT_SECONDS = 2.0
_WAIT_SECONDS = 10.0  # wait_for's default bound: only reached when the awaited thing never happens


@dataclass(frozen=True)
class ProxyStats:
    accepted: int  # connections accepted (refused and blackholed ones included)
    refused: int
    bytes_up: int  # client -> upstream, forwarded
    bytes_down: int  # upstream -> client, forwarded
    bytes_held: int  # read from a client, waiting (a delay, a blackhole) before going upstream
    delayed_chunks: int  # chunks (either way) that waited for a delay() before being forwarded
    cuts: int  # cut() calls
    links_cut: int  # connections closed by cut()
    half_closes: int  # connections half-closed by half_close()
    open_links: int


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close at once with a RST (SO_LINGER 0), as a dead peer or a firewall would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Link:
    """One proxied connection: the client's side and the upstream side."""

    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream = upstream
        # After half_close(): the client got EOF; what upstream says is read and dropped.
        self.down_closed = False

    def abort(self) -> None:
        _abort(self.client)
        _abort(self.upstream)


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self._server: asyncio.base_events.Server | None = None
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._delay_seconds = 0.0
        self._refusing = False
        # Set = traffic flows; cleared while blackholed (pumps wait on it).
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._accepted = self._refused = self._cuts = self._links_cut = self._half_closes = 0
        self._bytes_up = self._bytes_down = self._bytes_held = self._delayed_chunks = 0
        # Set (then cleared by the waiters) whenever a counter changes: what wait_for() waits on.
        self._changed = asyncio.Event()

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        return int(self._server.sockets[0].getsockname()[1])

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        self._flowing.set()
        for link in list(self._links):
            link.abort()
        for task in list(self._handlers):
            task.cancel()
        for task in list(self._handlers):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- commands ------------------------------------------------------------

    async def cut(self) -> int:
        """Kill every open connection both ways; returns how many. New connections are still accepted."""
        links = list(self._links)
        for link in links:
            link.abort()
        self._cuts += 1
        self._links_cut += len(links)
        self._count()
        return len(links)

    async def refuse(self, on: bool = True) -> None:
        """While on, new connections are closed right after accept (the client sees a reset)."""
        self._refusing = on

    async def delay(self, ms: float) -> None:
        """Every chunk forwarded from now on (either way) waits ``ms`` first; 0 = none."""
        self._delay_seconds = max(0.0, ms) / 1000

    async def half_close(self) -> int:
        """On every open connection, shut the way towards the client (it reads EOF) while
        what the client sends is still forwarded: Redis may run a command whose reply
        nobody receives. Returns how many connections."""
        links = [link for link in self._links if not link.down_closed]
        for link in links:
            link.down_closed = True
            with contextlib.suppress(OSError, RuntimeError):
                if link.client.can_write_eof():
                    link.client.write_eof()
        self._half_closes += len(links)
        self._count()
        return len(links)

    async def blackhole(self, on: bool = True) -> None:
        """While on, nothing is forwarded: new connections are accepted and read but never
        reach upstream (not even later), and open ones stall, keeping their bytes in
        order until it is turned off."""
        if on:
            self._flowing.clear()
        else:
            self._flowing.set()

    @property
    def stats(self) -> ProxyStats:
        return ProxyStats(accepted=self._accepted, refused=self._refused, bytes_up=self._bytes_up,
                          bytes_down=self._bytes_down, bytes_held=self._bytes_held,
                          delayed_chunks=self._delayed_chunks, cuts=self._cuts, links_cut=self._links_cut,
                          half_closes=self._half_closes, open_links=len(self._links))

    async def wait_for(self, predicate: Callable[[ProxyStats], bool], *,
                       timeout: float = _WAIT_SECONDS) -> ProxyStats:
        """Returns the stats as soon as ``predicate(stats)`` holds, re-checked on every change of
        a counter (no polling interval to guess); fails after ``timeout`` seconds, which only a
        broken test or proxy reaches."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate(stats := self.stats):
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"proxy never reached the awaited state; last stats: {stats}")
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        return stats

    def _count(self) -> None:
        self._changed.set()

    # -- plumbing ------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._accepted += 1
        self._count()
        try:
            if self._refusing:
                self._refused += 1
                self._count()
                _abort(writer)
            elif not self._flowing.is_set():
                await self._sink(reader, writer)
            else:
                await self._forward(reader, writer)
        finally:
            self._handlers.discard(task)

    async def _sink(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A blackholed connection: read and drop until the client gives up."""
        try:
            while await reader.read(_CHUNK_BYTES):
                pass
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            _abort(writer)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(self.upstream_host, self.upstream_port), _CONNECT_TIMEOUT_SECONDS)
        except (OSError, asyncio.TimeoutError):
            _abort(writer)  # upstream down: the client sees its connection die, as with no proxy
            return
        link = _Link(writer, up_writer)
        self._links.add(link)
        self._count()
        up = asyncio.create_task(self._pump(reader, up_writer, link, upstream=True))
        down = asyncio.create_task(self._pump(up_reader, writer, link, upstream=False))
        try:
            # The client going away ends the link; upstream going away too.
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._links.discard(link)
            self._count()
            link.abort()
            for pump in (up, down):
                pump.cancel()
            await asyncio.gather(up, down, return_exceptions=True)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, link: _Link, *,
                    upstream: bool) -> None:
        """Copies one way until EOF or an error; ends with the link."""
        held = 0  # bytes of this pump's current chunk counted in bytes_held
        try:
            while chunk := await src.read(_CHUNK_BYTES):
                if upstream:
                    held = len(chunk)
                    self._bytes_held += held
                    self._count()
                if self._delay_seconds:
                    self._delayed_chunks += 1
                    self._count()
                    await asyncio.sleep(self._delay_seconds)
                await self._flowing.wait()
                if not upstream and link.down_closed:
                    continue  # half-closed: the client must never see these bytes
                dst.write(chunk)
                await dst.drain()
                if upstream:
                    self._bytes_held -= held
                    held = 0
                    self._bytes_up += len(chunk)
                else:
                    self._bytes_down += len(chunk)
                self._count()
        except (OSError, RuntimeError):
            pass  # reset or aborted: the link is over
        finally:
            if held:  # the link ended with a chunk still held: it will never be forwarded
                self._bytes_held -= held
                self._count()

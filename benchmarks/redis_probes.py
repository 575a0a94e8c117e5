"""What Redis sees of a benchmark: command statistics, MONITOR windows, round trips, the raw script.

- ``Control``: the benchmark's own connection (CONFIG RESETSTAT, INFO commandstats / cpu).
- ``MonitorWindow``: a MONITOR connection over a short bounded window, counting the
  top-level commands other clients sent (MONITOR marks commands issued from Lua with
  "lua"; those and the benchmark's own connections are left out).
- ``RoundTripProxy``: a loopback TCP proxy in front of Redis that counts round trips per
  connection: a round trip starts when a client sends a command while none of its
  commands is waiting for a reply, and lasts until every reply is back (so a pipeline,
  or commands coalesced into one write, is one round trip).
- ``raw_reserve``: the sidecar's own reserve script call (FCALL, or EVALSHA on Redis 6.2) with real KEYS/ARGV
  (captured by running the engine in-process once), at several pipeline depths.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import socket
import threading
import time
import uuid
from collections import Counter
from typing import Any, Sequence

import hiredis
import redis
import redis.asyncio as aioredis

from quota_sidecar.domain.engine import QuotaEngine
from quota_sidecar.domain.model import JobParams
from quota_sidecar.server.plans_file import load_plans
from quota_sidecar.storage import mux as redis_mux
from quota_sidecar.storage import scripts
from quota_sidecar.storage.keys import account_keys
from quota_sidecar.storage.scripts import SCRIPT_NAMES, load_script_source
from quota_sidecar.storage.store import RedisStore

MONITOR_MAX_LINES = 500_000
MONITOR_STOP_TIMEOUT_SECONDS = 10.0
# The sidecar's periodic background work, not part of a decision: the health probe (PING), the
# sweeper's lease (SET NX), account scan (SCAN) and per-account sweep script, and the cameo
# registry's refresh (HGETALL of <prefix>:cameos every few seconds).
BACKGROUND_COMMANDS = {"PING", "SCAN", "SET", "EVALSHA sweep", "FCALL sweep", "HGETALL"}
# The commands a script call is sent as: FCALL of a library function (Redis 7), EVALSHA (6.2).
SCRIPT_VERBS = ("FCALL", "EVALSHA")


def script_refs() -> dict[str, str]:
    """sha1 or function name -> script name, for the scripts the sidecar loads (both modes)."""
    refs = {hashlib.sha1(load_script_source(n).encode()).hexdigest(): n for n in SCRIPT_NAMES}
    refs.update({scripts.function_name(n): n for n in SCRIPT_NAMES})
    return refs


def script_verb(client: redis.Redis) -> str:
    """The command the store sends decisions as on this server (see RedisStore._script_mode)."""
    version = str(client.info("server")["redis_version"])
    return "FCALL" if tuple(int(p) for p in version.split(".")[:2]) >= (7, 0) else "EVALSHA"


def load_reserve(client: redis.Redis, verb: str) -> None:
    """Loads what a captured reserve call names: the library (FCALL) or the reserve script."""
    if verb == "FCALL":
        client.function_load(scripts.library_source(), replace=True)
    else:
        client.script_load(load_script_source("reserve"))


# A library of one function that returns 1: what an FCALL costs before any script logic.
RETURN_1_LIBRARY = "#!lua name=qs_bench_return_1\nredis.register_function('qs_bench_return_1', function() return 1 end)"


def load_return_1(client: redis.Redis, verb: str) -> str:
    """A 'return 1' script called the way ``verb`` calls (FCALL: a registered function; EVALSHA: a
    script): what to put in a captured call's place of the reserve's function name or SHA1."""
    if verb == "FCALL":
        client.function_load(RETURN_1_LIBRARY, replace=True)
        return "qs_bench_return_1"
    return str(client.script_load("return 1"))


class Control:
    """The benchmark's own Redis connection (one connection, so its address is known)."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url, single_connection_client=True, decode_responses=True,
                                           socket_timeout=10)
        self.addr = self.client.client_info()["addr"]

    def reset_stats(self) -> None:
        self.client.config_resetstat()

    def commandstats(self) -> dict[str, dict[str, float]]:
        """INFO commandstats as {command: {calls, usec, usec_per_call}} (lower-case names)."""
        raw = self.client.info("commandstats")
        return {k.removeprefix("cmdstat_"): v for k, v in raw.items()}

    def cpu_seconds(self) -> float:
        info = self.client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def close(self) -> None:
        self.client.close()


_MONITOR_LINE = re.compile(r'^\+?\d+\.\d+ \[\d+ ([^\]]+)\] "([^"]*)"(?: "([^"]*)")?')


class MonitorWindow:
    """MONITOR from start() to stop(); stop() returns top-level commands by client and name.

    The window's end is exact: stop() sends a unique ECHO on the control connection and
    reads until MONITOR shows it, so every command Redis ran before it is counted."""

    def __init__(self, host: str, port: int, control: Control) -> None:
        self._control = control
        self._sock = socket.create_connection((host, port), timeout=MONITOR_STOP_TIMEOUT_SECONDS)
        self._marker = f"bench-monitor-end-{uuid.uuid4().hex}"
        self._commands: Counter[tuple[str, str, str]] = Counter()
        self._lines = 0
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._read, name="monitor", daemon=True)

    def start(self) -> None:
        self._sock.sendall(b"MONITOR\r\n")
        with self._sock.makefile("rb") as f:
            if f.readline().strip() != b"+OK":
                raise RuntimeError("MONITOR refused")
        self._thread.start()

    def _read(self) -> None:
        buffer = b""
        try:
            while self._lines < MONITOR_MAX_LINES:
                chunk = self._sock.recv(1 << 20)
                if not chunk:
                    return
                *lines, buffer = (buffer + chunk).split(b"\r\n")
                for line in lines:
                    if self._line(line.decode(errors="replace")):
                        return
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self._error = exc
        finally:
            self._done.set()

    def _line(self, line: str) -> bool:
        """Counts one MONITOR line; True at the end marker."""
        self._lines += 1
        match = _MONITOR_LINE.match(line)
        if match is None:
            return False
        client, command, first = match.groups()
        if client == self._control.addr:
            return command.upper() == "ECHO" and first == self._marker
        if client != "lua":
            name = command.upper()
            self._commands[(client, name, (first or "") if name in SCRIPT_VERBS else "")] += 1
        return False

    def stop(self) -> Counter[tuple[str, str, str]]:
        """(client address, command, function or sha for FCALL / EVALSHA) -> count, for every client but ours."""
        self._control.client.echo(self._marker)
        finished = self._done.wait(MONITOR_STOP_TIMEOUT_SECONDS)
        self._sock.close()
        self._thread.join(MONITOR_STOP_TIMEOUT_SECONDS)
        if self._error is not None or not finished:
            raise RuntimeError(f"MONITOR window did not end cleanly: {self._error!r}")
        return self._commands


def classify(commands: Counter[tuple[str, str, str]]) -> dict[str, Any]:
    """Decision-path commands (all but the periodic background ones), by name and script."""
    refs = script_refs()
    by_name: Counter[str] = Counter()
    background: Counter[str] = Counter()
    for (_, name, ref), count in commands.items():
        label = f"{name} {refs.get(ref, ref[:24])}" if name in SCRIPT_VERBS else name
        (background if name in BACKGROUND_COMMANDS or label in BACKGROUND_COMMANDS else by_name)[label] += count
    return {"decision_path": dict(by_name), "background": dict(background),
            "decision_path_total": sum(by_name.values())}


# ----------------------------------------------------------------------------- round trips


class _ConnTrips:
    """Round-trip bookkeeping of one proxied connection."""

    def __init__(self) -> None:
        self.requests = hiredis.Reader()
        self.replies = hiredis.Reader()
        self.outstanding = 0
        self.trips: list[Counter[str]] = []

    def client_sent(self, data: bytes) -> None:
        # A chunk that completes a command begun in the previous chunk belongs to the same write.
        continuing = self.requests.has_data()
        self.requests.feed(data)
        while (command := self.requests.gets()) is not False:
            name = bytes(command[0]).decode(errors="replace").upper() if command else "?"
            if self.outstanding == 0 and not continuing:
                self.trips.append(Counter())
            continuing = True
            if self.trips:
                self.trips[-1][name] += 1
            self.outstanding += 1

    def server_sent(self, data: bytes) -> None:
        self.replies.feed(data)
        while self.replies.gets() is not False:
            self.outstanding = max(0, self.outstanding - 1)


class RoundTripProxy:
    """127.0.0.1 proxy to Redis on its own event loop thread; ``trips()`` lists every round trip."""

    def __init__(self, redis_host: str, redis_port: int) -> None:
        self._upstream = (redis_host, redis_port)
        self._conns: list[_ConnTrips] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rt-proxy", daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self.port = 0

    def start(self) -> None:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        self.port = future.result(timeout=10)

    async def _listen(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, limit=1 << 22)
        return int(self._server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._upstream, limit=1 << 22)
        conn = _ConnTrips()
        self._conns.append(conn)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, count: Any) -> None:
            try:
                while data := await src.read(1 << 22):
                    count(data)
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer, conn.client_sent), pump(up_reader, writer, conn.server_sent))

    def take(self) -> list[Counter[str]]:
        """Every round trip of every connection since the last take() (command name -> count in it).

        Read and cleared on the proxy's own thread, so no trip is lost or counted twice."""
        async def take_all() -> list[Counter[str]]:
            trips = [t for c in self._conns for t in c.trips]
            for c in self._conns:
                c.trips = []
            return trips
        return asyncio.run_coroutine_threadsafe(take_all(), self._loop).result(timeout=10)

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
        asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


# ----------------------------------------------------------------------------- raw script


async def _capture_async(url: str, account: str, reservation_id: str) -> list[Any]:
    """The script call of one decision (FCALL, or EVALSHA on Redis 6.2), as the store's transport
    sends it (redis-py pipelines here, not the multiplexed connection, so the arguments are plain values)."""
    store = RedisStore(aioredis.Redis.from_url(url), multiplex=False)
    sent: list[tuple[Any, ...]] = []
    transport = store._transport
    send = transport.send

    async def recording(calls: Any) -> list[Any]:
        # (lua_cost.py --before runs this against older checkouts, whose store only sends EVALSHA.)
        verb = getattr(store, "script_verb", "EVALSHA")
        sent.extend((verb, ref, len(keys), *keys, *args) for ref, keys, args in calls)
        return await send(calls)

    transport.send = recording  # type: ignore[method-assign]
    try:
        engine = QuotaEngine(load_plans(None), store)
        await engine.check_and_reserve(account, "sora", reservation_id,
                                       JobParams(duration_seconds=10, resolution="720p"))
    finally:
        await store.close()
    # A NOSCRIPT reply (scripts not loaded yet) makes the store load the script and send the same call again.
    if len(set(sent)) != 1:
        raise RuntimeError(f"expected one script call for one decision, saw {len(set(sent))} different")
    return list(sent[-1])


def capture_reserve_call(url: str, account: str) -> list[Any]:
    """The FCALL (or EVALSHA) the sidecar sends for one decision on ``account`` (default settings), as a list."""
    return asyncio.run(_capture_async(url, account, f"capture-{uuid.uuid4().hex}"))


class ReserveTemplate:
    """A captured reserve call (FCALL or EVALSHA), re-targeted at any account and reservation id.

    Everything but the reservation id is encoded once per account (KEYS name the account,
    ARGV carries it), so the client spends its time sending, not packing."""

    def __init__(self, call: Sequence[Any], account: str, key_prefix: str = "qs", key_buckets: int = 256,
                 ref: str = "") -> None:
        self.call = [a.decode() if isinstance(a, bytes) else a for a in call]
        if ref:  # another function or script with the very same KEYS/ARGV (the cost of a call, not of its logic)
            self.call[1] = ref
        self.account, self.prefix, self.buckets = account, key_prefix, key_buckets
        numkeys = int(self.call[2])
        self.keys_at = slice(3, 3 + numkeys)
        argv = self.call[3 + numkeys:]
        # The header's account id (see store._header) and the reservation id follow the keys.
        self.account_at = 3 + numkeys + argv.index(account)
        self.rid_at = next(i for i, a in enumerate(self.call) if isinstance(a, str) and a.startswith("capture-"))
        self._packed: dict[str, tuple[redis_mux.Packed, redis_mux.Packed]] = {}

    def _parts(self, account: str) -> tuple[redis_mux.Packed, redis_mux.Packed]:
        parts = self._packed.get(account)
        if parts is None:
            call = list(self.call)
            call[self.keys_at] = account_keys(self.prefix, self.buckets, account)
            call[self.account_at] = account
            parts = (redis_mux.Packed(call[:self.rid_at]), redis_mux.Packed(call[self.rid_at + 1:]))
            self._packed[account] = parts
        return parts

    def command(self, account: str, reservation_id: str) -> bytes:
        head, tail = self._parts(account)
        return redis_mux.pack_command([head, reservation_id, tail])


def raw_reserve(url: str, template: ReserveTemplate, accounts: Sequence[str], *, depth: int,
                seconds: float, max_calls: int = 2_000_000) -> dict[str, float]:
    """Script calls in pipelines of ``depth`` on one redis-py connection for ``seconds``; client-side rate."""
    pool = redis.ConnectionPool.from_url(url)
    conn = pool.get_connection()
    calls = 0
    errors = 0
    tag = uuid.uuid4().hex[:8]
    started = time.perf_counter()
    try:
        while time.perf_counter() - started < seconds and calls < max_calls:
            commands = [template.command(accounts[(calls + i) % len(accounts)], f"raw-{tag}-{calls + i}")
                        for i in range(depth)]
            conn.send_packed_command([b"".join(commands)])  # a list: bytes alone would be iterated
            for _ in commands:
                try:
                    conn.read_response()
                except redis.ResponseError:
                    errors += 1
            calls += depth
    finally:
        pool.release(conn)
        pool.disconnect()
    elapsed = time.perf_counter() - started
    return {"calls": calls, "errors": errors, "elapsed_seconds": elapsed, "calls_per_second": calls / elapsed}

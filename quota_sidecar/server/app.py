"""The grpc.aio server: wiring, health, reflection, sweeper, graceful stop.

``create_server`` / ``create_admin_server`` build servers around an engine so
tests can bind port 0 and talk over a real channel. Only the admin server
authenticates (quota_sidecar.server.auth: a bearer-token interceptor and TLS/mTLS
credentials); the worker-facing one has no admin methods to protect. ``run`` is what
``quota-sidecar serve`` does: plans, Redis (embedded when no URL is given),
store, engine, servers, sweeper, plans reloading (file watcher and SIGHUP,
quota_sidecar.server.plans_source), the metrics endpoint, and SIGTERM handling (stop
accepting, let in-flight calls finish within the grace period, exit 0).

Every server closes connections that never finish their handshake, stay idle or
grow old (Settings' connection limits), and ``run`` raises the open-file limit
and watches the descriptors in use, so silent connections cannot starve the
workers' calls unnoticed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import os
import signal
import socket
import time
import uuid
from typing import Any, Awaitable, Callable, Coroutine, Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from quota_sidecar import __version__
from quota_sidecar.domain.clock import Clock, RedisClock
from quota_sidecar.domain.degraded import DegradedMode
from quota_sidecar.domain.engine import QuotaEngine
from quota_sidecar.domain.errors import QuotaError, Unavailable
from quota_sidecar.domain.model import OutboxStats
from quota_sidecar.domain.plans import Plans
from quota_sidecar.domain.ports import Books
from quota_sidecar.domain.shipping import ShipCounts, Shipper, lag_seconds
from quota_sidecar.server.addresses import is_loopback_address
from quota_sidecar.server.auth import AdminAuth, load_admin_auth
from quota_sidecar.server.journal import FileJournal
from quota_sidecar.server.metrics import Metrics, MetricsHTTPServer, SweepResult
from quota_sidecar.server.plans_source import PlansSource
from quota_sidecar.server.servicer import (
    ADMIN_NAME,
    SERVICE_NAME,
    QuotaAdmin,
    QuotaService,
    add_quota_admin,
    add_quota_service,
)
from quota_sidecar.server.settings import Settings
from quota_sidecar.server.telemetry import Telemetry, Tracing
from quota_sidecar.storage.redis_server import RedisServerProcess, find_redis_server
from quota_sidecar.storage.store import RedisStore

log = logging.getLogger("quota_sidecar.server.app")

HEALTH_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


def run_until_complete(main: Coroutine[Any, Any, Any], event_loop: str = "auto") -> Any:
    """Runs ``main`` on the event loop ``event_loop`` names (see Settings.event_loop)."""
    if event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if event_loop == "uvloop":
                main.close()
                raise RuntimeError("--event-loop uvloop: uvloop is not installed") from None
        else:
            return uvloop.run(main)
    return asyncio.run(main)


def _options(settings: Settings, *, reuse_port: bool = False) -> list[tuple[str, int]]:
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", 4 * 1024 * 1024),
        # Two sidecars must never silently share one port (gRPC's default allows it); the
        # workers of one `serve --workers N` share theirs on purpose (quota_sidecar.server.workers).
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        # Connections that never finish their handshake are closed, so they cannot hold the
        # process's file descriptors (and with them every worker's calls) for gRPC's default 120 s.
        ("grpc.server_handshake_timeout_ms", settings.server_handshake_timeout_ms),
        ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
    ]
    # 0 = never: gRPC's own default (no option) is "infinite".
    if settings.max_connection_idle_ms:
        options.append(("grpc.max_connection_idle_ms", settings.max_connection_idle_ms))
    if settings.max_connection_age_ms:
        options += [("grpc.max_connection_age_ms", settings.max_connection_age_ms),
                    ("grpc.max_connection_age_grace_ms", settings.max_connection_age_grace_ms)]
    return options


class CallCounter(grpc.aio.ServerInterceptor):
    """Counts the calls a worker received, so its stop log says how much of the load it took."""

    def __init__(self) -> None:
        self.calls = 0

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        self.calls += 1
        return await continuation(handler_call_details)


@contextlib.contextmanager
def _umask(mask: int | None) -> Iterator[None]:
    """Sets the process umask for the block (None: leaves it alone)."""
    if mask is None:
        yield
        return
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def _bind(server: grpc.aio.Server, addresses: tuple[str, ...],
          credentials: grpc.ServerCredentials | None = None, *, owner_only: bool = False) -> int:
    """Binds every address (TLS when credentials are given); returns the first TCP port (0 when only unix sockets).

    ``owner_only``: unix sockets are created 0600 (gRPC binds them here). A chmod after the bind
    would come too late: a connection made in between stays open whatever the mode becomes.
    """
    first_port = 0
    for address in addresses:
        with _umask(0o177 if owner_only and address.startswith("unix:") else None):
            port = (server.add_secure_port(address, credentials) if credentials is not None
                    else server.add_insecure_port(address))
        if not address.startswith("unix:"):
            if port == 0:
                raise OSError(f"cannot listen on {address}")
            first_port = first_port or port
    return first_port


def _new_server(settings: Settings, addresses: tuple[str, ...], service_name: str,
                add_servicer: Callable[[grpc.aio.Server], None],
                health: health_aio.HealthServicer | None, *,
                interceptors: tuple[grpc.aio.ServerInterceptor, ...] = (),
                credentials: grpc.ServerCredentials | None = None,
                reuse_port: bool = False, owner_only: bool = False) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(options=_options(settings, reuse_port=reuse_port), interceptors=interceptors or None)
    add_servicer(server)
    health_pb2_grpc.add_HealthServicer_to_server(health or health_aio.HealthServicer(), server)
    reflection.enable_server_reflection((service_name, HEALTH_NAME, reflection.SERVICE_NAME), server)
    return server, _bind(server, addresses, credentials, owner_only=owner_only)


def create_server(settings: Settings, engine: QuotaEngine, *, health: health_aio.HealthServicer | None = None,
                  metrics: Metrics | None = None, reuse_port: bool = False,
                  interceptors: tuple[grpc.aio.ServerInterceptor, ...] = (),
                  tracer: Any = None) -> tuple[grpc.aio.Server, int]:
    """The worker-facing server (QuotaService, health, reflection); not started.

    ``reuse_port``: bind with SO_REUSEPORT, for the workers of ``serve --workers N`` only.
    ``tracer``: an OpenTelemetry tracer (quota_sidecar.server.telemetry.Tracing) or None.
    """
    service = QuotaService(engine, metrics, max_batch_items=settings.max_batch_items, tracer=tracer)
    return _new_server(settings, settings.listen, SERVICE_NAME,
                       lambda s: add_quota_service(s, service),
                       health, interceptors=interceptors, reuse_port=reuse_port)


def create_admin_server(settings: Settings, engine: QuotaEngine, *, health: health_aio.HealthServicer | None = None,
                        auth: AdminAuth | None = None, metrics: Metrics | None = None,
                        tracer: Any = None) -> tuple[grpc.aio.Server, int]:
    """The billing-side server (QuotaAdmin, health, reflection) on --admin-listen; not started.

    QuotaAdmin calls need a bearer token when settings.admin_token_file is set
    (health and reflection never do); the addresses speak TLS, and with a
    client CA demand a client certificate, when settings.admin_tls_cert is set.
    ``auth`` is what ``load_admin_auth(settings)`` returns; loaded here when not given.
    Its unix sockets are created owner-only (0600); ``_chmod_sockets`` then applies
    settings.admin_unix_socket_mode once the server is started.
    """
    assert settings.admin_listen, "admin server needs admin_listen"
    auth = auth or load_admin_auth(settings)
    return _new_server(settings, settings.admin_listen, ADMIN_NAME,
                       lambda s: add_quota_admin(s, QuotaAdmin(engine, metrics, tracer=tracer)), health,
                       interceptors=auth.interceptors, credentials=auth.credentials, owner_only=True)


HEALTH_NAMES = ("", SERVICE_NAME, ADMIN_NAME)
# A health name for liveness probes: SERVING while the process answers, whatever Redis does (the
# names above follow Redis, right for readiness, wrong for restarts); NOT_SERVING only while stopping.
LIVENESS_NAME = "liveness"


def create_health_server(settings: Settings, health: health_aio.HealthServicer) -> tuple[grpc.aio.Server, int]:
    """grpc.health.v1 alone on --health-listen (TCP), sharing ``health`` with the other servers; not started.

    Kubernetes' gRPC probes dial the pod IP, so they cannot reach a worker API on a
    unix socket; this server lets them see its status without exposing QuotaService.
    """
    assert settings.health_listen, "health server needs health_listen"
    server = grpc.aio.server(options=_options(settings))
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    return server, _bind(server, (settings.health_listen,))


# How often the Redis health verdict is re-judged: NOT_SERVING comes at most this late after the grace period.
HEALTH_JUDGE_INTERVAL_SECONDS = 0.25


class RedisHealthJudge:
    """Whether Redis counts as healthy, from the time of its last answer alone.

    Kept apart from the probing so that a ping that hangs (a stopped Redis, a
    black-holed network: up to the Redis deadline, twice with the retry) cannot
    delay the verdict: the judge looks at the clock, not at the ping.
    """

    def __init__(self, unhealthy_after_seconds: float, now_seconds: float) -> None:
        self.unhealthy_after_seconds = unhealthy_after_seconds
        self.last_ok_seconds = now_seconds  # a grace period from the start, as after an answer

    def observe_ok(self, now_seconds: float) -> None:
        self.last_ok_seconds = max(self.last_ok_seconds, now_seconds)

    def judge(self, now_seconds: float) -> bool:
        """True (healthy) unless Redis last answered longer than the grace period ago."""
        return now_seconds - self.last_ok_seconds <= self.unhealthy_after_seconds


class RedisHealthWatch:
    """Pings Redis and publishes the judge's verdict on the health service.

    Two loops: one pings (and records each answer), one re-judges on a timer
    independently of any ping in flight. Either publishes a change at once:
    NOT_SERVING as soon as the last answer is older than the grace period,
    SERVING at the first answer after that. ``monotonic`` (seconds) is the
    judge's clock, injectable for tests; the loops themselves sleep in real time.
    """

    def __init__(self, store: RedisStore, health: health_aio.HealthServicer, unhealthy_after_seconds: float, *,
                 metrics: Metrics | None = None, monotonic: Callable[[], float] | None = None) -> None:
        self._store = store
        self._health = health
        self._metrics = metrics
        self._monotonic = monotonic or asyncio.get_running_loop().time
        self.judge = RedisHealthJudge(unhealthy_after_seconds, self._monotonic())
        self.serving = True  # what the health service says; the servers start SERVING
        self.pinging = False  # a ping is in flight (tests look)
        self.judgements = 0  # verdicts reached so far (tests look)
        self._lock = asyncio.Lock()

    async def refresh(self) -> None:
        """Judges now and publishes a change; the verdict is taken under the lock, so two
        callers cannot publish their verdicts in the wrong order."""
        async with self._lock:
            healthy = self.judge.judge(self._monotonic())
            self.judgements += 1
            if not healthy and self._metrics is not None:
                self._metrics.redis_reachable(False)  # no answer within the grace period
            if healthy == self.serving:
                return
            self.serving = healthy
            status = health_pb2.HealthCheckResponse.SERVING if healthy else health_pb2.HealthCheckResponse.NOT_SERVING
            for name in HEALTH_NAMES:
                await self._health.set(name, status)
        if healthy:
            log.warning("redis answers again: health SERVING")
        else:
            log.warning("redis has not answered for over %.1f s: health NOT_SERVING",
                        self.judge.unhealthy_after_seconds)

    async def ping_forever(self, interval_seconds: float) -> None:
        while True:
            self.pinging = True
            try:
                await self._store.ping()
                ok = True
            except QuotaError:
                ok = False
            except Exception:  # noqa: BLE001 - a bug in one probe must not end the probing
                log.exception("redis health probe failed")
                ok = False
            finally:
                self.pinging = False
            if self._metrics is not None:
                self._metrics.redis_reachable(ok)
            if ok:
                self.judge.observe_ok(self._monotonic())
                await self.refresh()
            await asyncio.sleep(interval_seconds)

    async def run(self, probe_interval_seconds: float = 1.0,
                  judge_interval_seconds: float = HEALTH_JUDGE_INTERVAL_SECONDS) -> None:
        """Until cancelled."""
        pinger = asyncio.create_task(self.ping_forever(probe_interval_seconds), name="redis-health-ping")
        try:
            while True:
                await asyncio.sleep(judge_interval_seconds)
                await self.refresh()
        finally:
            await _cancel([pinger])


async def watch_redis_health(store: RedisStore, health: health_aio.HealthServicer, unhealthy_after_seconds: float, *,
                             probe_interval_seconds: float = 1.0, metrics: Metrics | None = None,
                             monotonic: Callable[[], float] | None = None) -> None:
    """Health follows Redis: NOT_SERVING once it has not answered for longer than the grace
    period (a blip does not flap readiness), even while a ping still hangs; SERVING again at
    the first answer. See RedisHealthWatch."""
    watch = RedisHealthWatch(store, health, unhealthy_after_seconds, metrics=metrics, monotonic=monotonic)
    await watch.run(probe_interval_seconds, min(probe_interval_seconds, HEALTH_JUDGE_INTERVAL_SECONDS))


async def replay_degraded_forever(engine: QuotaEngine, interval_seconds: float = 1.0) -> None:
    """Writes jobs allowed without Redis into it as soon as it answers (a journal left by an
    earlier run included)."""
    while True:
        if engine.degraded is not None and engine.degraded.pending:
            await engine.flush_degraded()
        await asyncio.sleep(interval_seconds)


CAMEO_REFRESH_SECONDS = 5.0


async def refresh_cameos_forever(engine: QuotaEngine, interval_seconds: float = CAMEO_REFRESH_SECONDS) -> None:
    """Keeps this sidecar's copy of the cameos (admin data in Redis) at most ``interval_seconds``
    old: a cameo set or deactivated through another sidecar applies here within that delay.
    A failed read keeps the copy in use (decisions never read cameos from Redis themselves)."""
    while True:
        try:
            await engine.refresh_cameos()
        except Exception:  # noqa: BLE001 - keep the last copy; retry at the next interval
            log.warning("reading the cameos from Redis failed; keeping the last copy", exc_info=True)
        await asyncio.sleep(interval_seconds)


async def sweep_forever(engine: QuotaEngine, store: RedisStore, interval_seconds: float,
                        metrics: Metrics | None = None) -> None:
    """Refunds expired holds of idle accounts; one sidecar of a fleet per interval (a Redis lease)."""
    owner = uuid.uuid4().hex
    lease_ms = max(1000, int(interval_seconds * 1000 * 0.9))
    while True:
        await asyncio.sleep(interval_seconds)
        result, expired = await sweep_once(engine, store, owner, lease_ms)
        if metrics is not None:
            metrics.sweep_pass(result, expired)


async def sweep_once(engine: QuotaEngine, store: RedisStore, owner: str, lease_ms: int) -> tuple[SweepResult, int]:
    """One sweeper pass, if this sidecar gets the lease: (result, holds expired)."""
    loop = asyncio.get_running_loop()
    renewed_at = loop.time()

    async def keep_lease() -> bool:
        # Renewed once a third of it has passed, so a long pass never outlives it: another
        # sidecar taking over mid-pass would sweep the same accounts at the same time.
        nonlocal renewed_at
        if loop.time() - renewed_at < lease_ms / 3000:
            return True
        renewed_at = loop.time()
        return await store.renew_lock("sweeper", owner, lease_ms)

    try:
        if not await store.try_lock("sweeper", owner, lease_ms):
            return "not_leader", 0
        expired = await engine.sweep(keep_lease)
    except QuotaError as exc:
        log.warning("sweeper skipped a round: %s", exc.message)
        return "error", 0
    if expired:
        log.info("sweeper refunded %d expired hold(s)", expired)
    return "ok", expired


# A warning once the process holds this share of its open-file limit, repeated at most every
# FD_WARN_EVERY_SECONDS while it stays there (an attack or a leak would otherwise flood the log).
FD_WARN_FRACTION = 0.9
FD_WARN_EVERY_SECONDS = 60.0
# Counting /proc/self/fd costs ~0.1 ms per thousand descriptors: once a second is cheap.
FD_CHECK_INTERVAL_SECONDS = 1.0
# Where the hard limit is "unlimited", setrlimit refuses that as a soft limit: aim at this instead.
_NOFILE_CEILING = 1 << 20


def raise_open_file_limit() -> int | None:
    """Raises the soft RLIMIT_NOFILE to the hard limit (logged); returns the soft limit in force.

    Every connection is a descriptor; distributions' default soft limit (often 1024) is
    a fraction of what the hard limit allows an unprivileged process. None where there is
    no such limit (unlimited, or not a Unix).
    """
    try:
        import resource
    except ImportError:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        log.info("open-file limit (RLIMIT_NOFILE): unlimited")
        return None
    target = _NOFILE_CEILING if hard == resource.RLIM_INFINITY else hard
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
        else:
            log.info("raised the open-file limit (soft RLIMIT_NOFILE) from %d to the hard limit %d", soft, target)
            return target
    log.info("open-file limit (RLIMIT_NOFILE): %d", soft)
    return soft


def count_open_fds(limit: int) -> int | None:
    """The process's open descriptors (Linux /proc, or /dev/fd); None where they cannot be listed.

    Listing the folder takes a descriptor itself: at the limit that fails with EMFILE,
    which means the count is the limit.
    """
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(folder)) - 1  # less the descriptor of the listing itself
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                return limit
    return None


async def watch_open_fds(metrics: Metrics | None, limit: int, *,
                         interval_seconds: float = FD_CHECK_INTERVAL_SECONDS,
                         monotonic: Callable[[], float] = time.monotonic) -> None:
    """Until cancelled: the open descriptors as a gauge, and a rate-limited WARNING near the limit.

    At the limit new connections wait in the kernel's accept queue and their calls
    time out without a word from gRPC: this says why.
    """
    if count_open_fds(limit) is None:
        return  # nothing to count on this platform
    if metrics is not None:
        metrics.file_descriptors(limit=limit)
    warned_at: float | None = None
    while True:
        count = count_open_fds(limit) or 0
        if metrics is not None:
            metrics.file_descriptors(open_count=count)
        now = monotonic()
        if count >= FD_WARN_FRACTION * limit and (warned_at is None or now - warned_at >= FD_WARN_EVERY_SECONDS):
            warned_at = now
            log.warning("%d of %d file descriptors open (%.0f%% of the open-file limit): new connections will "
                        "wait or fail; raise the limit (ulimit -n, LimitNOFILE) or lower "
                        "--server-handshake-timeout-ms / --max-connection-idle-ms if idle connections pile up",
                        count, limit, 100 * count / limit)
        await asyncio.sleep(interval_seconds)


def start_embedded_redis(settings: Settings) -> RedisServerProcess:
    """The development redis-server on settings.data_dir; its stop() also withdraws redis.url and the lock.

    The data folder's lock comes first (DataDirInUse when another serve has it): a second
    redis-server on the same folder would share the first one's AOF (quota_sidecar.server.data_dir).
    """
    from quota_sidecar.server.data_dir import REDIS_URL_FILE, DataDirLock, EmbeddedRedis

    lock = DataDirLock.acquire(settings.data_dir)
    try:
        binary = find_redis_server(settings.redis_server)
        process = EmbeddedRedis(binary, os.path.abspath(settings.data_dir), lock, appendonly=True,
                                appendfsync="everysec")
        process.start()
    except BaseException:
        lock.release()
        raise
    log.warning("no --redis-url: started an embedded redis-server %s (%s) on %s with data in %s (URL in %s for "
                "the local tools); this is for development only", ".".join(map(str, process.version)), binary,
                process.url, process.data_dir, process.data_dir / REDIS_URL_FILE)
    return process


def start_embedded_books(settings: Settings) -> Any:
    """The development books: a PostgreSQL in <data_dir>/books (kept across restarts, like the embedded
    Redis' AOF), its URL in <data_dir>/books.url for the local tools while it runs. Called with the data
    folder's lock held (start_embedded_redis took it)."""
    from quota_sidecar.books.postgres_server import PostgresServerProcess
    from quota_sidecar.server.data_dir import BOOKS_URL_FILE, write_url

    # grant_traverse: as root PostgreSQL runs as an unprivileged user, which needs the search bit (not
    # the right to list) on the owner-only data folder and those above it to reach its own.
    process = PostgresServerProcess(os.path.join(os.path.abspath(settings.data_dir), "books"), grant_traverse=True)
    process.start()
    write_url(settings.data_dir, BOOKS_URL_FILE, process.url)
    log.warning("no --books-url: started embedded books, %s, on %s with data in %s (URL in %s for the local "
                "tools); this is for development only", process.describe(), process.url, process.data_dir,
                os.path.join(settings.data_dir, BOOKS_URL_FILE))
    return process


def stop_embedded_books(settings: Settings, process: Any) -> None:
    from quota_sidecar.server.data_dir import BOOKS_URL_FILE, remove_url

    remove_url(settings.data_dir, BOOKS_URL_FILE, process.url)
    process.stop()


async def open_books(url: str) -> Books:
    """The books at ``url``, migrated. PostgreSQL away at start-up is logged, not fatal: decisions never
    need the books, and the shipper and ListLedger retry (PgBooks reconnects on its next call)."""
    from quota_sidecar.books.pg import PgBooks

    books = PgBooks(url)
    try:
        applied = await books.migrate()
        if applied:
            log.info("books: applied migration(s) %s", ", ".join(applied))
    except Unavailable as exc:
        log.error("books unreachable at start-up (%s); the outbox keeps every movement until they are back",
                  exc.message)
    return books


def shipper_owner() -> str:
    """Who holds the shipper's lease, as its log lines and the lease key say: host and pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


def record_ship_pass(metrics: Metrics, clock: Clock) -> Callable[[ShipCounts, OutboxStats | None, bool], None]:
    """The shipper's on_pass: its counts and the outbox's size and age into the books metrics."""

    def on_pass(counts: ShipCounts, stats: OutboxStats | None, failed: bool) -> None:
        metrics.books_pass(counts.inserted, counts.conflicts, stats.entries if stats else None,
                           lag_seconds(stats, clock.local_now_ms()) if stats else None, failed)

    return on_pass


async def ship_forever(outbox: RedisStore, books_url: str, metrics: Metrics, stop: asyncio.Event) -> None:
    """The in-process shipper (quota_sidecar.domain.shipping): the fleet lease, then the outbox to the books.
    Its own connection to the books, so ListLedger never waits behind a shipping transaction."""
    from quota_sidecar.books.pg import PgBooks

    books = PgBooks(books_url)
    clock = RedisClock()
    shipper = Shipper(outbox, books, clock, owner=shipper_owner(), on_pass=record_ship_pass(metrics, clock))
    try:
        await shipper.run(stop)
    finally:
        await books.close()


async def run(settings: Settings, *, clock: Clock | None = None,
              on_ready: Callable[[dict[str, int]], Awaitable[None] | None] | None = None,
              worker: int | None = None) -> None:
    """Serve until SIGTERM/SIGINT; then stop gracefully. SIGHUP reloads the plans file.

    ``worker``: this process is worker K of ``serve --workers N`` (quota_sidecar.server.workers): the
    listen ports are bound with SO_REUSEPORT and the start and stop are logged with K.

    The signal handlers come first: a SIGTERM during start-up still stops
    gracefully (and stops the embedded Redis) once start-up is done, and a
    SIGHUP (whose default action would kill the process) is kept and served
    once the plans reloader runs.
    """
    stop = asyncio.Event()
    hangup = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, hangup.set)
    # Token and certificate files first: a bad one fails before Redis is started or anything is bound.
    admin_auth = load_admin_auth(settings) if settings.admin_listen else None
    fd_limit = raise_open_file_limit()
    metrics = Metrics()

    def use_plans(new: Plans) -> None:
        engine.set_plans(new)  # bound below; reloads start only in _serve, once the engine exists

    plans_source = PlansSource(settings.plans or None, use_plans, metrics=metrics)
    plans = plans_source.load_initial()
    tracing = Tracing(settings.tracing, service_version=__version__)
    embedded = None if settings.redis_url else start_embedded_redis(settings)
    embedded_books = None
    try:
        if embedded is not None and not settings.books_url:
            embedded_books = start_embedded_books(settings)
        books_url = settings.books_url or (embedded_books.url if embedded_books is not None else "")
        books = await open_books(books_url) if books_url else None
        redis_url = settings.redis_url or (embedded.url if embedded else "")
        store = RedisStore.from_url(redis_url, timeout_seconds=settings.redis_timeout_ms / 1000,
                                    redis_mode=settings.redis_mode if settings.redis_url else "single",
                                    key_prefix=settings.key_prefix, key_buckets=settings.key_buckets,
                                    retention_ms=settings.retention_seconds * 1000,
                                    events_max_entries=settings.events_max_entries,
                                    max_records_per_account=settings.max_records_per_account,
                                    max_open_holds_per_account=settings.max_open_holds_per_account,
                                    grant_min_replicas=settings.grant_min_replicas,
                                    grant_wait_timeout_ms=settings.grant_wait_timeout_ms,
                                    telemetry=Telemetry(metrics, tracing.tracer))
        try:
            await store.ping()
            await store.load_scripts()
            engine = QuotaEngine(plans, store, clock, degraded=DegradedMode(FileJournal(settings.degraded_journal)),
                                 books=books)
            await _serve(settings, engine, store, stop, on_ready, admin_auth,
                         plans_source=plans_source, metrics=metrics, hangup=hangup, worker=worker,
                         tracer=tracing.tracer, fd_limit=fd_limit, books_url=books_url)
        finally:
            await store.close()
            if books is not None:
                await books.close()
    finally:
        tracing.shutdown()
        if embedded_books is not None:
            stop_embedded_books(settings, embedded_books)
        if embedded is not None:
            embedded.stop()


async def _reload_on_hangup(plans_source: PlansSource, hangup: asyncio.Event) -> None:
    while True:
        await hangup.wait()
        # Cleared before reading: a SIGHUP during this reload asks for one more, several pending ones for one.
        hangup.clear()
        try:
            await plans_source.reload("SIGHUP")
        except Exception:  # noqa: BLE001 - keep serving SIGHUPs; the plans in use are untouched
            log.exception("plans reload on SIGHUP failed")


def _plans_tasks(settings: Settings, plans_source: PlansSource, stop: asyncio.Event,
                 hangup: asyncio.Event) -> list[asyncio.Task[None]]:
    tasks = [asyncio.create_task(_reload_on_hangup(plans_source, hangup), name="plans-sighup")]
    if plans_source.path is not None and settings.plans_reload_interval_seconds:
        tasks.append(asyncio.create_task(plans_source.watch(settings.plans_reload_interval_seconds, stop),
                                         name="plans-watcher"))
    return tasks


def _watch_tasks(settings: Settings, engine: QuotaEngine, store: RedisStore, health: health_aio.HealthServicer,
                 metrics: Metrics, fd_limit: int | None, books_url: str = "",
                 stop: asyncio.Event | None = None) -> list[asyncio.Task[None]]:
    """The running server's timers: degraded replay, Redis health, sweeper, shipper, file descriptors."""
    tasks = [asyncio.create_task(replay_degraded_forever(engine), name="degraded-replay"),
             asyncio.create_task(refresh_cameos_forever(engine), name="cameo-refresh")]
    if settings.redis_unhealthy_after_seconds:
        tasks.append(asyncio.create_task(watch_redis_health(
            store, health, settings.redis_unhealthy_after_seconds, metrics=metrics), name="redis-health"))
    if settings.sweep_interval_seconds:
        tasks.append(asyncio.create_task(sweep_forever(engine, store, settings.sweep_interval_seconds, metrics),
                                         name="sweeper"))
    if books_url and settings.ship_books and stop is not None:
        tasks.append(asyncio.create_task(ship_forever(store, books_url, metrics, stop), name="books-shipper"))
    if fd_limit:
        tasks.append(asyncio.create_task(watch_open_fds(metrics, fd_limit), name="fd-watcher"))
    return tasks


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _start_servers(settings: Settings, engine: QuotaEngine, health: health_aio.HealthServicer,
                         admin_auth: AdminAuth | None, metrics: Metrics | None = None,
                         counter: CallCounter | None = None,
                         tracer: Any = None) -> tuple[list[grpc.aio.Server], dict[str, int], str]:
    """Binds and starts the worker server (and the admin one); returns them, their ports and the admin log text.

    With a ``counter`` (a worker of ``serve --workers N``), the listen ports are shared (SO_REUSEPORT)."""
    server, port = create_server(settings, engine, health=health, metrics=metrics, reuse_port=counter is not None,
                                 interceptors=(counter,) if counter is not None else (), tracer=tracer)
    servers = [server]
    ports = {"listen": port}
    admin_text = ""
    if settings.admin_listen:
        admin_auth = admin_auth or load_admin_auth(settings)
        admin, admin_port = create_admin_server(settings, engine, health=health, auth=admin_auth, metrics=metrics,
                                                tracer=tracer)
        if not admin_auth.interceptors and not admin_auth.mtls:
            log.warning("QuotaAdmin on %s accepts calls without credentials (allowed on loopback and unix "
                        "sockets only); set --admin-token-file and/or mTLS", ", ".join(settings.admin_listen))
        servers.append(admin)
        ports["admin"] = admin_port
        admin_text = f"; QuotaAdmin on {', '.join(settings.admin_listen)} ({admin_auth.describe()})"
    exposed = [a for a in settings.listen if not is_loopback_address(a)]
    if exposed:  # only with --listen-on-private-network (settings refuse it otherwise)
        log.warning("QuotaService on %s is reachable from the network and authenticates nobody: anyone who "
                    "reaches it can spend any account's credits (--listen-on-private-network)", ", ".join(exposed))
    for s in servers:
        await s.start()
    _chmod_sockets(settings)
    return servers, ports, admin_text


def _chmod_sockets(settings: Settings) -> None:
    """--unix-socket-mode on the worker sockets (when set), --admin-unix-socket-mode on the admin ones.

    The admin ones never take the worker mode: a worker socket opened to every local user
    must not open QuotaAdmin to them too."""
    for addresses, mode in ((settings.listen, settings.socket_mode()),
                            (settings.admin_listen, settings.admin_socket_mode())):
        for address in addresses:
            if mode is not None and address.startswith("unix:"):
                path = address[len("unix:"):]
                os.chmod(path[2:] if path.startswith("//") else path, mode)


def freeze_startup_heap(ports: dict[str, int] | None = None) -> None:
    """``serve``'s on_ready: what start-up built (modules, grpc, the plans) lives as long as the
    process, so it leaves the collector's generations and full collections stop walking it
    (measured: ~40 ms each, ~20 us per decision under load, before). Collected first, so nothing
    frozen is garbage; reference counting still frees everything, only a cycle made before this
    and dropped later would stay. Not in run() itself: tests run servers inside the test process."""
    gc.collect()
    gc.freeze()


async def _serve(settings: Settings, engine: QuotaEngine, store: RedisStore, stop: asyncio.Event,
                 on_ready: Callable[[dict[str, int]], Awaitable[None] | None] | None,
                 admin_auth: AdminAuth | None = None, *, plans_source: PlansSource, metrics: Metrics,
                 hangup: asyncio.Event, worker: int | None = None, tracer: Any = None,
                 fd_limit: int | None = None, books_url: str = "") -> None:
    # Metrics first: an address in use fails the start before any gRPC port is bound.
    metrics_http = MetricsHTTPServer(metrics, settings.metrics_listen) if settings.metrics_listen else None
    health = health_aio.HealthServicer()
    health_server: grpc.aio.Server | None = None
    try:
        if settings.health_listen:
            # Started first and stopped last: probes see NOT_SERVING until the servers are up and
            # through the whole drain, never a refused port.
            for name in (*HEALTH_NAMES, LIVENESS_NAME):
                await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
            health_server, health_port = create_health_server(settings, health)
            await health_server.start()
        counter = CallCounter() if worker is not None else None
        servers, ports, admin_text = await _start_servers(settings, engine, health, admin_auth, metrics, counter,
                                                          tracer)
        if metrics_http is not None:
            ports["metrics"] = metrics_http.port
        if health_server is not None:
            ports["health"] = health_port
        for name in (*HEALTH_NAMES, LIVENESS_NAME):
            await health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving QuotaService on %s%s (plans %s)", ", ".join(settings.listen), admin_text,
                 plans_source.version)
        if worker is not None:
            log.info("worker %d (pid %d) serving", worker, os.getpid())

        tasks = _plans_tasks(settings, plans_source, stop, hangup) + _watch_tasks(
            settings, engine, store, health, metrics, fd_limit, books_url, stop)
        try:
            if on_ready is not None:
                maybe = on_ready(ports)
                if maybe is not None:
                    await maybe
            await stop.wait()
            log.info("stopping: no new calls; in-flight calls have %.1f s", settings.shutdown_grace_seconds)
            await health.enter_graceful_shutdown()
        finally:
            # Plans stop changing before the last calls finish; they finish with the plans they read.
            await _cancel(tasks)
        await asyncio.gather(*(s.stop(settings.shutdown_grace_seconds) for s in servers))
        if counter is not None:
            log.info("worker %d (pid %d) stopped after %d call(s)", worker, os.getpid(), counter.calls)
    finally:
        if health_server is not None:
            await health_server.stop(0)
        if metrics_http is not None:
            await metrics_http.aclose()
    log.info("stopped")

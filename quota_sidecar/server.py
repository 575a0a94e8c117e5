"""The grpc.aio server: wiring, health, reflection, sweeper, graceful stop.

``create_server`` / ``create_admin_server`` build servers around an engine so
tests can bind port 0 and talk over a real channel. Only the admin server
authenticates (quota_sidecar.auth: a bearer-token interceptor and TLS/mTLS
credentials); the worker-facing one has no admin methods to protect. ``run`` is what
``quota-sidecar serve`` does: plans, Redis (embedded when no URL is given),
store, engine, servers, sweeper, plans reloading (file watcher and SIGHUP,
quota_sidecar.plans_source), the metrics endpoint, and SIGTERM handling (stop
accepting, let in-flight calls finish within the grace period, exit 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import uuid
from typing import Any, Awaitable, Callable, Coroutine

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from ._proto.quota.v1 import quota_pb2, quota_pb2_grpc
from . import __version__
from .auth import AdminAuth, load_admin_auth
from .clock import Clock
from .degraded import DegradedMode
from .engine import QuotaEngine
from .errors import QuotaError
from .metrics import Metrics, MetricsHTTPServer, SweepResult
from .plans import Plans
from .plans_source import PlansSource
from .redis_server import RedisServerProcess, find_redis_server
from .servicer import QuotaAdmin, QuotaService
from .settings import Settings
from .store import RedisStore
from .telemetry import Telemetry, Tracing

log = logging.getLogger("quota_sidecar.server")

SERVICE_NAME = quota_pb2.DESCRIPTOR.services_by_name["QuotaService"].full_name
ADMIN_NAME = quota_pb2.DESCRIPTOR.services_by_name["QuotaAdmin"].full_name
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
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", 4 * 1024 * 1024),
        # Two sidecars must never silently share one port (gRPC's default allows it); the
        # workers of one `serve --workers N` share theirs on purpose (quota_sidecar.workers).
        ("grpc.so_reuseport", 1 if reuse_port else 0),
    ]


class CallCounter(grpc.aio.ServerInterceptor):
    """Counts the calls a worker received, so its stop log says how much of the load it took."""

    def __init__(self) -> None:
        self.calls = 0

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        self.calls += 1
        return await continuation(handler_call_details)


def _bind(server: grpc.aio.Server, addresses: tuple[str, ...],
          credentials: grpc.ServerCredentials | None = None) -> int:
    """Binds every address (TLS when credentials are given); returns the first TCP port (0 when only unix sockets)."""
    first_port = 0
    for address in addresses:
        port = (server.add_secure_port(address, credentials) if credentials is not None
                else server.add_insecure_port(address))
        if not address.startswith("unix:"):
            if port == 0:
                raise OSError(f"cannot listen on {address}")
            first_port = first_port or port
    return first_port


def _new_server(settings: Settings, addresses: tuple[str, ...], service_name: str,
                add_servicer: Callable[[grpc.aio.Server], None],
                health: HealthServicer | None, *,
                interceptors: tuple[grpc.aio.ServerInterceptor, ...] = (),
                credentials: grpc.ServerCredentials | None = None,
                reuse_port: bool = False) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(options=_options(settings, reuse_port=reuse_port), interceptors=interceptors or None)
    add_servicer(server)
    health_pb2_grpc.add_HealthServicer_to_server(health or HealthServicer(), server)
    reflection.enable_server_reflection((service_name, HEALTH_NAME, reflection.SERVICE_NAME), server)
    return server, _bind(server, addresses, credentials)


def create_server(settings: Settings, engine: QuotaEngine, *, health: HealthServicer | None = None,
                  metrics: Metrics | None = None, reuse_port: bool = False,
                  interceptors: tuple[grpc.aio.ServerInterceptor, ...] = (),
                  tracer: Any = None) -> tuple[grpc.aio.Server, int]:
    """The worker-facing server (QuotaService, health, reflection); not started.

    ``reuse_port``: bind with SO_REUSEPORT, for the workers of ``serve --workers N`` only.
    ``tracer``: an OpenTelemetry tracer (quota_sidecar.telemetry.Tracing) or None.
    """
    service = QuotaService(engine, metrics, max_batch_items=settings.max_batch_items, tracer=tracer)
    return _new_server(settings, settings.listen, SERVICE_NAME,
                       lambda s: quota_pb2_grpc.add_QuotaServiceServicer_to_server(service, s),
                       health, interceptors=interceptors, reuse_port=reuse_port)


def create_admin_server(settings: Settings, engine: QuotaEngine, *, health: HealthServicer | None = None,
                        auth: AdminAuth | None = None, metrics: Metrics | None = None,
                        tracer: Any = None) -> tuple[grpc.aio.Server, int]:
    """The billing-side server (QuotaAdmin, health, reflection) on --admin-listen; not started.

    QuotaAdmin calls need a bearer token when settings.admin_token_file is set
    (health and reflection never do); the addresses speak TLS, and with a
    client CA demand a client certificate, when settings.admin_tls_cert is set.
    ``auth`` is what ``load_admin_auth(settings)`` returns; loaded here when not given.
    """
    assert settings.admin_listen, "admin server needs admin_listen"
    auth = auth or load_admin_auth(settings)
    return _new_server(settings, settings.admin_listen, ADMIN_NAME,
                       lambda s: quota_pb2_grpc.add_QuotaAdminServicer_to_server(
                           QuotaAdmin(engine, metrics, tracer=tracer), s), health,
                       interceptors=auth.interceptors, credentials=auth.credentials)


HEALTH_NAMES = ("", SERVICE_NAME, ADMIN_NAME)
# A health name for liveness probes: SERVING while the process answers, whatever Redis does (the
# names above follow Redis, right for readiness, wrong for restarts); NOT_SERVING only while stopping.
LIVENESS_NAME = "liveness"


def create_health_server(settings: Settings, health: HealthServicer) -> tuple[grpc.aio.Server, int]:
    """grpc.health.v1 alone on --health-listen (TCP), sharing ``health`` with the other servers; not started.

    Kubernetes' gRPC probes dial the pod IP, so they cannot reach a worker API on a
    unix socket; this server lets them see its status without exposing QuotaService.
    """
    assert settings.health_listen, "health server needs health_listen"
    server = grpc.aio.server(options=_options(settings))
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    return server, _bind(server, (settings.health_listen,))


async def watch_redis_health(store: RedisStore, health: HealthServicer, unhealthy_after_seconds: float, *,
                             probe_interval_seconds: float = 1.0, metrics: Metrics | None = None) -> None:
    """Health follows Redis: NOT_SERVING once it has been unreachable for longer than the
    grace period (a blip does not flap readiness), SERVING again at the first answer."""
    loop = asyncio.get_running_loop()
    last_ok = loop.time()
    serving = True
    while True:
        try:
            await store.ping()
            last_ok, reachable = loop.time(), True
        except QuotaError:
            reachable = False
        if metrics is not None:
            metrics.redis_reachable(reachable)
        healthy = reachable or loop.time() - last_ok <= unhealthy_after_seconds
        if healthy != serving:
            serving = healthy
            status = health_pb2.HealthCheckResponse.SERVING if healthy else health_pb2.HealthCheckResponse.NOT_SERVING
            for name in HEALTH_NAMES:
                await health.set(name, status)
            if healthy:
                log.warning("redis answers again: health SERVING")
            else:
                log.warning("redis unreachable for over %.1f s: health NOT_SERVING", unhealthy_after_seconds)
        await asyncio.sleep(probe_interval_seconds)


async def replay_degraded_forever(engine: QuotaEngine, interval_seconds: float = 1.0) -> None:
    """Writes jobs allowed without Redis into it as soon as it answers (a journal left by an
    earlier run included)."""
    while True:
        if engine.degraded is not None and engine.degraded.pending:
            await engine.flush_degraded()
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
    try:
        if not await store.try_lock("sweeper", owner, lease_ms):
            return "not_leader", 0
        expired = await engine.sweep()
    except QuotaError as exc:
        log.warning("sweeper skipped a round: %s", exc.message)
        return "error", 0
    if expired:
        log.info("sweeper refunded %d expired hold(s)", expired)
    return "ok", expired


def start_embedded_redis(settings: Settings) -> RedisServerProcess:
    binary = find_redis_server(settings.redis_server)
    process = RedisServerProcess(binary, os.path.abspath(settings.data_dir), appendonly=True, appendfsync="everysec")
    process.start()
    log.warning("no --redis-url: started an embedded redis-server %s (%s) on %s with data in %s; "
                "this is for development only", ".".join(map(str, process.version)), binary, process.url,
                process.data_dir)
    return process


async def run(settings: Settings, *, clock: Clock | None = None,
              on_ready: Callable[[dict[str, int]], Awaitable[None] | None] | None = None,
              worker: int | None = None) -> None:
    """Serve until SIGTERM/SIGINT; then stop gracefully. SIGHUP reloads the plans file.

    ``worker``: this process is worker K of ``serve --workers N`` (quota_sidecar.workers): the
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
    metrics = Metrics()

    def use_plans(new: Plans) -> None:
        engine.set_plans(new)  # bound below; reloads start only in _serve, once the engine exists

    plans_source = PlansSource(settings.plans or None, use_plans, metrics=metrics)
    plans = plans_source.load_initial()
    tracing = Tracing(settings.tracing, service_version=__version__)
    embedded = None if settings.redis_url else start_embedded_redis(settings)
    try:
        redis_url = settings.redis_url or (embedded.url if embedded else "")
        store = RedisStore.from_url(redis_url, timeout_seconds=settings.redis_timeout_ms / 1000,
                                    redis_mode=settings.redis_mode if settings.redis_url else "single",
                                    key_prefix=settings.key_prefix, key_buckets=settings.key_buckets,
                                    retention_ms=settings.retention_seconds * 1000,
                                    ledger_retention_ms=settings.ledger_retention_days * 86_400_000,
                                    events_max_entries=settings.events_max_entries,
                                    grant_min_replicas=settings.grant_min_replicas,
                                    grant_wait_timeout_ms=settings.grant_wait_timeout_ms,
                                    telemetry=Telemetry(metrics, tracing.tracer))
        try:
            await store.ping()
            await store.load_scripts()
            engine = QuotaEngine(plans, store, clock, degraded=DegradedMode(settings.degraded_journal))
            await _serve(settings, engine, store, stop, on_ready, admin_auth,
                         plans_source=plans_source, metrics=metrics, hangup=hangup, worker=worker,
                         tracer=tracing.tracer)
        finally:
            await store.close()
    finally:
        tracing.shutdown()
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


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _start_servers(settings: Settings, engine: QuotaEngine, health: HealthServicer,
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
    for s in servers:
        await s.start()
    _chmod_sockets(settings)
    return servers, ports, admin_text


def _chmod_sockets(settings: Settings) -> None:
    mode = settings.socket_mode()
    if mode is None:
        return
    for address in settings.listen + settings.admin_listen:
        if address.startswith("unix:"):
            path = address[len("unix:"):]
            os.chmod(path[2:] if path.startswith("//") else path, mode)


async def _serve(settings: Settings, engine: QuotaEngine, store: RedisStore, stop: asyncio.Event,
                 on_ready: Callable[[dict[str, int]], Awaitable[None] | None] | None,
                 admin_auth: AdminAuth | None = None, *, plans_source: PlansSource, metrics: Metrics,
                 hangup: asyncio.Event, worker: int | None = None, tracer: Any = None) -> None:
    # Metrics first: an address in use fails the start before any gRPC port is bound.
    metrics_http = MetricsHTTPServer(metrics, settings.metrics_listen) if settings.metrics_listen else None
    health = HealthServicer()
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

        tasks = _plans_tasks(settings, plans_source, stop, hangup)
        tasks.append(asyncio.create_task(replay_degraded_forever(engine), name="degraded-replay"))
        if settings.redis_unhealthy_after_seconds:
            tasks.append(asyncio.create_task(watch_redis_health(
                store, health, settings.redis_unhealthy_after_seconds, metrics=metrics), name="redis-health"))
        if settings.sweep_interval_seconds:
            tasks.append(asyncio.create_task(sweep_forever(engine, store, settings.sweep_interval_seconds, metrics),
                                             name="sweeper"))
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

"""The sidecar's Prometheus metrics, all in one place, and their HTTP endpoint.

One ``Metrics`` object is made per ``run`` (and per test) with its own
``CollectorRegistry``: the process-global registry would refuse a second
metric of the same name, so servers could not be created twice in one
process. Each metric has a small method per event it records, so callers
never touch prometheus_client objects directly; the servicers and the store
reach the per-call ones through quota_sidecar.server.telemetry. The README's
Observability section lists them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, Iterable, Literal
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest, start_http_server

from quota_sidecar.server.addresses import split_host_port

log = logging.getLogger("quota_sidecar.server.metrics")

ReloadOutcome = Literal["ok", "error", "unchanged"]
RELOAD_OUTCOMES: tuple[ReloadOutcome, ...] = ("ok", "error", "unchanged")
SweepResult = Literal["ok", "not_leader", "error"]
SWEEP_RESULTS: tuple[SweepResult, ...] = ("ok", "not_leader", "error")
# Seconds. A decision takes ~0.2-2 ms in-process; the upper buckets catch Redis trouble up to the
# default 2 s Redis deadline and callers' longer deadlines.
LATENCY_BUCKETS_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# serve_forever notices shutdown() within its 0.5 s poll; a request being answered gets this long more.
_STOP_TIMEOUT_SECONDS = 5.0


class Metrics:
    """Every metric the sidecar exports, registered in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._plans_reloads = Counter(
            "quota_plans_reloads", "Plans reloads (file change or SIGHUP) by result: ok = new plans in use, "
            "unchanged = same file content, error = file refused and the last good plans kept",
            ["result"], registry=self.registry)
        for outcome in RELOAD_OUTCOMES:
            # Series exist from the start, so rate() and alerts see 0 rather than nothing.
            self._plans_reloads.labels(result=outcome)
        self._plans_info = Info("quota_plans", "Version of the plans in use", registry=self.registry)
        self._plans_last_reload_error = Gauge(
            "quota_plans_last_reload_error", "1 while the last plans reload failed (the last good plans are "
            "still in use), else 0", registry=self.registry)
        self._plans_last_reload_timestamp = Gauge(
            "quota_plans_last_reload_timestamp_seconds", "Unix time of the last plans load or reload attempt, "
            "whatever its result", registry=self.registry)

        self._redis_up = Gauge("quota_redis_up", "1 when the last health probe of Redis was answered, else 0",
                               registry=self.registry)
        self._redis_up.set(1)
        self._degraded_decisions = Counter(
            "quota_degraded_decisions", "Free jobs allowed without Redis under a fail_open_free policy, by product",
            ["product"], registry=self.registry)
        self._shadow_decisions = Counter(
            "quota_shadow_decisions", "Decisions that a limit in shadow mode would have changed (free funding "
            "refused, or a concurrency cap hit) had it been enforced, by product and limit id",
            ["product", "limit"], registry=self.registry)

        self._open_fds = Gauge(
            "quota_open_fds", "File descriptors open in this process (connections, Redis, files), counted "
            "every second on Linux", registry=self.registry)
        self._max_fds = Gauge(
            "quota_max_fds", "The process's open-file limit (soft RLIMIT_NOFILE, raised to the hard limit at "
            "start-up)", registry=self.registry)

        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        self._init_books()
        self._init_decisions()
        self._init_transport()

    def _init_books(self) -> None:
        """The shipper's (quota_sidecar.domain.shipping): what is not yet in the books, and how old."""
        self._books_lag = Gauge(
            "quota_books_lag_seconds", "Age of the oldest movement in the Redis outbox not yet shipped to the books "
            "(PostgreSQL), seconds; 0 when everything is shipped; measured by the shipper after each pass",
            registry=self.registry)
        self._books_outbox = Gauge(
            "quota_books_outbox_entries", "Movements in the Redis outbox not yet shipped to the books (every bucket)",
            registry=self.registry)
        self._books_shipped = Counter(
            "quota_books_shipped_entries", "Outbox entries the books stored (new rows; a batch shipped again after "
            "a crash counts once)", registry=self.registry)
        self._books_conflicts = Counter(
            "quota_books_conflicts", "Outbox entries whose account sequence number the books already held under "
            "another entry id (kept in quota_ledger_conflicts; Redis lost acknowledged writes)",
            registry=self.registry)
        self._books_errors = Counter(
            "quota_books_errors", "Shipper passes that failed (Redis or PostgreSQL unreachable); retried with a "
            "growing pause", registry=self.registry)

    def books_pass(self, inserted: int, conflicts: int, outbox_entries: int | None, lag_seconds: float | None,
                   failed: bool) -> None:
        self._books_shipped.inc(inserted)
        self._books_conflicts.inc(conflicts)
        if outbox_entries is not None:
            self._books_outbox.set(outbox_entries)
        if lag_seconds is not None:
            self._books_lag.set(lag_seconds)
        if failed:
            self._books_errors.inc()

    def _init_decisions(self) -> None:
        self._decisions = Counter(
            "quota_decisions", "CheckAndReserve decisions (batch items included; replays of a retried call "
            "excluded) by product, outcome (allowed, denied), funding (free, credits, none) and denial reason "
            "(none when allowed)", ["product", "outcome", "funding", "reason"], registry=self.registry)
        self._quotes = Counter(
            "quota_quotes", "Quote answers (what CheckAndReserve would decide; nothing held) by product, outcome "
            "(allowed, denied) and the denial reason it would meet (none when allowed): prices and purchase "
            "offers shown before a job", ["product", "outcome", "reason"], registry=self.registry)
        self._replays = Counter(
            "quota_decision_replays", "CheckAndReserve calls answered from the stored decision of an earlier call "
            "with the same reservation id (a retry), by product", ["product"], registry=self.registry)
        self._sweeps = Counter(
            "quota_sweeper_passes", "Sweeper passes by result: ok = this sidecar held the lease and swept, "
            "not_leader = another sidecar held it, error = Redis failed", ["result"], registry=self.registry)
        for result in SWEEP_RESULTS:
            self._sweeps.labels(result=result)
        self._holds_expired = Counter(
            "quota_sweeper_holds_expired", "Expired holds the sweeper settled (refunded), in passes this sidecar ran",
            registry=self.registry)

    def _init_transport(self) -> None:
        self._rpc_seconds = Histogram(
            "quota_rpc_duration_seconds", "Time from a gRPC call's arrival in the servicer to its answer, by "
            "service, method and status code", ["service", "method", "code"], buckets=LATENCY_BUCKETS_SECONDS,
            registry=self.registry)
        self._redis_seconds = Histogram(
            "quota_redis_call_duration_seconds", "Round trips to Redis for the scripts, by script (a batch RPC's "
            "items share one round trip: one observation)", ["script"], buckets=LATENCY_BUCKETS_SECONDS,
            registry=self.registry)
        self._redis_errors = Counter(
            "quota_redis_errors", "Script calls Redis did not answer with a result (unreachable, timeout, "
            "READONLY, NOSCRIPT after reload...) by script and the error's reason", ["script", "reason"],
            registry=self.registry)

    def _child(self, metric: Any, values: tuple[str, ...]) -> Any:
        """``metric.labels(*values)`` without its ~3 us of validation and locking on every call: the
        label values of the per-call metrics come from small fixed sets (methods, codes, scripts,
        the plans' products)."""
        child = self._children.get((metric, values))
        if child is None:
            child = self._children[(metric, values)] = metric.labels(*values)
        return child

    def decision(self, product: str, allowed: bool, funding: str, reason: str, replayed: bool) -> None:
        """One CheckAndReserve answer; ``funding`` and ``reason`` are the model's values or ``none``."""
        if replayed:
            self._child(self._replays, (product,)).inc()
        else:
            self._child(self._decisions, (product, "allowed" if allowed else "denied", funding, reason)).inc()

    def quote(self, product: str, allowed: bool, reason: str) -> None:
        """One Quote answer; ``reason`` is the denial it would meet, or ``none``."""
        self._child(self._quotes, (product, "allowed" if allowed else "denied", reason)).inc()

    def rpc_handled(self, service: str, method: str, code: str, seconds: float) -> None:
        self._child(self._rpc_seconds, (service, method, code)).observe(seconds)

    def redis_call(self, script: str, seconds: float, error_reason: str = "") -> None:
        self._child(self._redis_seconds, (script,)).observe(seconds)
        if error_reason:
            self._child(self._redis_errors, (script, error_reason)).inc()

    def sweep_pass(self, result: SweepResult, holds_expired: int = 0) -> None:
        self._sweeps.labels(result=result).inc()
        self._holds_expired.inc(holds_expired)

    def degraded_decision(self, product: str) -> None:
        self._degraded_decisions.labels(product=product).inc()

    def redis_reachable(self, reachable: bool) -> None:
        self._redis_up.set(1 if reachable else 0)

    def file_descriptors(self, open_count: int | None = None, limit: int | None = None) -> None:
        """The open descriptors and/or the limit, whichever is given."""
        if open_count is not None:
            self._open_fds.set(open_count)
        if limit is not None:
            self._max_fds.set(limit)

    def shadow_decision(self, product: str, limit_ids: Iterable[str]) -> None:
        for limit_id in limit_ids:
            self._shadow_decisions.labels(product=product, limit=limit_id).inc()

    def plans_loaded(self, version: str, at_seconds: float) -> None:
        """The plans of ``version`` are in use (start-up or a successful reload)."""
        # info() replaces the whole label set: the old version's series disappears.
        self._plans_info.info({"version": version})
        self._plans_last_reload_error.set(0)
        self._plans_last_reload_timestamp.set(at_seconds)

    def plans_reloaded(self, outcome: ReloadOutcome, at_seconds: float) -> None:
        self._plans_reloads.labels(result=outcome).inc()
        self._plans_last_reload_error.set(1 if outcome == "error" else 0)
        self._plans_last_reload_timestamp.set(at_seconds)

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric, as the HTTP endpoint serves it."""
        return generate_latest(self.registry)


class MetricsHTTPServer:
    """prometheus_client's HTTP server (a daemon thread) serving one registry, with a clean stop."""

    def __init__(self, metrics: Metrics, listen: str) -> None:
        host, port = split_host_port(listen)
        self._httpd: WSGIServer
        self._thread: threading.Thread
        self._httpd, self._thread = start_http_server(port, addr=host, registry=metrics.registry)
        self.port: int = self._httpd.server_port
        # With port 0 the kernel picked one: log the real one (the host part keeps its brackets).
        log.info("metrics on http://%s:%d/metrics", listen.rpartition(":")[0], self.port)

    def stop(self) -> None:
        """Blocks until the server thread has exited (up to its 0.5 s poll); call it off the event loop."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(_STOP_TIMEOUT_SECONDS)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.stop)

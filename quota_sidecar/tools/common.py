"""What the command-line tools share: default targets, exit statuses, the Redis flags of the tools
that read Redis, admin credentials, and printing. Kept apart so cli, cli_client, audit and loadtest
import it instead of each other."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from typing import Any, Callable, Mapping

import grpc

from quota_sidecar.server.settings import Settings, env_name

DEFAULT_TARGET = "127.0.0.1:50051"
# By convention the admin API sits on the next port; it is off unless --admin-listen is given.
DEFAULT_ADMIN_TARGET = "127.0.0.1:50052"
CLIENT_TIMEOUT_SECONDS = 10.0
# Verbs that call QuotaAdmin: they default to the admin target and take the admin credentials flags.
ADMIN_VERBS = frozenset({"grant", "set-account", "revoke", "refund", "account", "ledger", "set-cameo", "cameo"})
ADMIN_TOKEN_ENV = "QUOTA_ADMIN_TOKEN"

# Exit statuses. A denial is not an error (the call worked) but must not read as "go ahead":
# `quota-sidecar reserve ... && render` may render only after ALLOWED, hence a status of its own.
EXIT_OK = 0
EXIT_ERROR = 1           # a failed call, an unreachable sidecar; audit: violations found
EXIT_USAGE = 2           # bad flags or settings; audit: could not run at all (grep's convention)
EXIT_DENIED = 3          # reserve: the job may not run; nothing is held. quote: it would be denied
# stdout closed early (`ledger | head`): what a process killed by SIGPIPE reports in a shell
# (128 + 13), as cat or grep would; 0 would claim the whole output was delivered.
EXIT_BROKEN_PIPE = 141
EXIT_STATUS_TEXT = """exit status:
  0    success (reserve: ALLOWED; commit or release the hold; quote: would be allowed)
  1    error: a failed gRPC call or an unreachable sidecar; serve could not start;
       audit: violations found
  2    bad usage or setting; serve: its data folder is used by another serve;
       audit: could not run (no or unreachable Redis)
  3    reserve: DENIED (nothing held), so `quota-sidecar reserve ... && render`
       renders only what was allowed; quote: would be denied
  141  standard output was closed early (e.g. piped into head)"""


def redis_flags(p: argparse.ArgumentParser, what: str) -> None:
    """--redis-url and the key layout flags of the tools that read Redis; each falls back to serve's
    QUOTA_* variable and default (resolved by redis_options), so one environment serves both."""
    p.add_argument("--redis-url", default=None, metavar="URL", help=(
        f"{what} [env QUOTA_REDIS_URL; default: the URL a development `serve` (no --redis-url) keeps in "
        "<data dir>/redis.url while it runs]"))
    p.add_argument("--data-dir", default=None, metavar="DIR", help=(
        "data folder of that development serve, as its --data-dir [env QUOTA_DATA_DIR; default: .quota-sidecar]"))
    p.add_argument("--redis-mode", default=None, metavar="MODE", help=(
        "as the sidecars' --redis-mode: auto, single, cluster or sentinel [env QUOTA_REDIS_MODE; default: auto]"))
    p.add_argument("--key-prefix", default=None, metavar="PREFIX",
                   help="as the sidecars' --key-prefix [env QUOTA_KEY_PREFIX; default: qs]")
    p.add_argument("--key-buckets", type=int, default=None, metavar="N",
                   help="as the sidecars' --key-buckets [env QUOTA_KEY_BUCKETS; default: 256]")


@dataclass(frozen=True)
class RedisOptions:
    url: str
    source: str  # "" when the URL was a flag; else where it came from (said on stderr)
    mode: str
    key_prefix: str
    key_buckets: int


def redis_options(args: argparse.Namespace, *, need_url: bool = True,
                  environ: Mapping[str, str] | None = None) -> RedisOptions:
    """The redis_flags, each: the flag, else serve's QUOTA_* variable, else serve's default; the URL as
    data_dir.resolve_redis_url finds it. ValueError (NoRedisUrl, or a malformed variable) with a
    one-line message; ``need_url=False`` gives url "" instead of NoRedisUrl."""
    from quota_sidecar.server.data_dir import NoRedisUrl, resolve_redis_url

    environ = os.environ if environ is None else environ
    defaults = {f.name: f.default for f in fields(Settings)}

    def value(name: str) -> Any:
        given = getattr(args, name)
        if given is not None:
            return given
        raw = environ.get(env_name(name), "").strip()
        if not raw:
            return defaults[name]
        if isinstance(defaults[name], int):  # key_buckets; the others are text
            try:
                return int(raw)
            except ValueError:
                raise ValueError(f"{env_name(name)}: cannot parse {raw!r} as an integer") from None
        return raw

    try:
        url, source = resolve_redis_url(args.redis_url, data_dir=args.data_dir, environ=environ)
    except NoRedisUrl:
        if need_url:
            raise
        url, source = "", ""
    return RedisOptions(url, source, value("redis_mode"), value("key_prefix"), value("key_buckets"))


def _read_client_file(path: str, flag: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        # ValueError: run_verb reports it as a usage error (exit 2).
        raise ValueError(f"cannot read {flag} {path}: {exc.strerror or exc}") from None


def admin_token(args: argparse.Namespace) -> str | None:
    """The bearer token: --token-file's first non-blank, non-# line, else $QUOTA_ADMIN_TOKEN, else None."""
    if args.token_file:
        lines = _read_client_file(args.token_file, "--token-file").decode("utf-8", "replace").splitlines()
        token = next((t for t in (line.strip() for line in lines) if t and not t.startswith("#")), "")
        if not token:
            raise ValueError(f"--token-file {args.token_file} holds no token")
    else:
        token = os.environ.get(ADMIN_TOKEN_ENV, "").strip()
    # gRPC metadata values are printable ASCII; say so here rather than fail inside the call.
    if token and any(not 0x21 <= ord(c) <= 0x7E for c in token):
        raise ValueError("the admin token must be printable ASCII without spaces")
    return token or None


def channel_credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    """TLS credentials from --tls-ca (and --tls-cert/--tls-key for mTLS), or None for plaintext."""
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    if args.tls_cert and not args.tls_ca:
        raise ValueError("--tls-cert needs --tls-ca (the CA of the sidecar's certificate)")
    if not args.tls_ca:
        if args.tls_server_name:
            raise ValueError("--tls-server-name needs --tls-ca")
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read_client_file(args.tls_ca, "--tls-ca"),
        private_key=_read_client_file(args.tls_key, "--tls-key") if args.tls_key else None,
        certificate_chain=_read_client_file(args.tls_cert, "--tls-cert") if args.tls_cert else None)


def format_time(ms: int, tz: str = "UTC") -> str:
    from zoneinfo import ZoneInfo

    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).astimezone(ZoneInfo(tz)).strftime("%Y-%m-%d %H:%M:%S %Z")


def print_json(obj: Any, write: Callable[[str], Any] = sys.stdout.write) -> None:
    # ensure_ascii: every non-ASCII character as \uXXXX, so text from the server (C1 controls,
    # bidi overrides) never reaches the terminal raw; json.loads gives it back unchanged.
    write(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=True) + "\n")

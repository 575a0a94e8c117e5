"""Redis URLs as --redis-url takes them, parsed and validated without importing redis (settings
validation uses this; quota_sidecar.storage.connect connects with the result)."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

from quota_sidecar.domain.errors import ConfigError

MODES = ("auto", "single", "cluster", "sentinel")

_SINGLE_SCHEMES = ("redis", "rediss", "unix")
_CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
_SENTINEL_SCHEMES = ("redis+sentinel",)
_FIELD = "redis_url"


@dataclass(frozen=True)
class ParsedUrl:
    """What connect() needs of a cluster or sentinel URL (single URLs go to redis-py as they are)."""

    mode: str
    hosts: tuple[tuple[str, int], ...] = ()
    username: str | None = None
    password: str | None = None
    ssl: bool = False
    service_name: str = ""
    db: int = 0


def _bad(description: str) -> ConfigError:
    return ConfigError(_FIELD, description)


def _host_port(text: str, default_port: int) -> tuple[str, int]:
    if text.startswith("["):  # [IPv6]:port
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise _bad(f"bad address {text!r}")
        port_text = rest[1:]
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise _bad(f"bad address {text!r}: no host")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise _bad(f"bad port in {text!r}")
    return host, int(port_text)


def _split_netloc(netloc: str, default_port: int) -> tuple[str | None, str | None, tuple[tuple[str, int], ...]]:
    """``[user:pass@]h1:p1,h2:p2`` (urllib cannot parse several hosts)."""
    userinfo, at, hostlist = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = urllib.parse.unquote(user) or None
        password = urllib.parse.unquote(secret) if colon else None
    parts = [part.strip() for part in hostlist.split(",")]
    if not any(parts):
        raise _bad("names no host")
    if not all(parts):
        raise _bad("has an empty host in its host list")
    return username, password, tuple(_host_port(part, default_port) for part in parts)


def _check_query(query: str, allowed: tuple[str, ...]) -> dict[str, str]:
    values = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise _bad(f"unknown option(s) {', '.join(unknown)} (allowed: {', '.join(allowed) or 'none'})")
    return values


def parse_url(url: str, mode: str = "auto") -> ParsedUrl:
    """Validates ``url`` against ``mode``; ConfigError naming redis_url on any problem."""
    if mode not in MODES:
        raise ConfigError("redis_mode", f"must be one of {', '.join(MODES)}, not {mode!r}")
    if not url:
        raise _bad("is empty")
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in _SINGLE_SCHEMES + _CLUSTER_SCHEMES + _SENTINEL_SCHEMES:
        raise _bad("must start with redis://, rediss://, unix://, redis+cluster:// or redis+sentinel://")
    implied = "cluster" if scheme in _CLUSTER_SCHEMES else "sentinel" if scheme in _SENTINEL_SCHEMES else "single"
    chosen = implied if mode == "auto" else mode
    if chosen == "cluster" and scheme in ("redis", "rediss"):
        implied = "cluster"  # a plain URL names one startup node of the cluster
    if chosen != implied:
        raise _bad(f"a {scheme}:// URL cannot be used with redis_mode {mode}")
    if chosen == "single":
        return ParsedUrl(mode="single")
    split = urllib.parse.urlsplit(f"x://{rest}")
    if chosen == "cluster":
        username, password, hosts = _split_netloc(split.netloc, 6379)
        _check_query(split.query, ())
        if split.path.strip("/") not in ("", "0"):
            raise _bad("a cluster has only database 0")
        return ParsedUrl(mode="cluster", hosts=hosts, username=username, password=password,
                         ssl=scheme.startswith("rediss"))
    username, password, hosts = _split_netloc(split.netloc, 26379)
    service = urllib.parse.unquote(split.path.strip("/"))
    if not service or "/" in service:
        raise _bad("a sentinel URL names the master after the hosts: redis+sentinel://h1:p1,h2:p2/mymaster")
    db_text = _check_query(split.query, ("db",)).get("db", "0")
    if not db_text.isdigit():
        raise _bad(f"db must be a number, not {db_text!r}")
    return ParsedUrl(mode="sentinel", hosts=hosts, username=username, password=password, service_name=service,
                     db=int(db_text))

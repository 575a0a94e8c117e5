"""Listen addresses as the settings take them: pure parsing, no grpc or prometheus_client, so
settings validation imports nothing heavy."""

from __future__ import annotations

import ipaddress


def is_loopback_address(address: str) -> bool:
    """True for unix sockets, localhost and 127.0.0.0/8 or ::1 (``host:port`` or ``[v6]:port``).

    Anything else, including an empty host (all interfaces) or another host
    name (it could resolve anywhere), counts as reachable from the network.
    """
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    if address.startswith("["):
        host = address[1:].partition("]")[0]
    else:
        host = address.rpartition(":")[0] if ":" in address else address
    if host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool(ip.is_loopback or (mapped is not None and mapped.is_loopback))


def split_host_port(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` → (host, port); ValueError when malformed."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"expected HOST:PORT, got {listen!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)  # raises ValueError
    elif ":" in host:
        raise ValueError(f"an IPv6 address needs brackets, e.g. [::1]:9464 (got {listen!r})")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port must be 0..65535 (got {port})")
    return host, port

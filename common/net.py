"""Addresses on this machine: whether a host is loopback-only, a free loopback port for a
child server (llama-server, a test's Valkey), and the address to announce for a server that
listens on all interfaces."""

from __future__ import annotations

import ipaddress
import socket


def is_loopback(host: str) -> bool:
    """Whether `host` reaches only this machine. A host name other than `localhost`, or ""
    (all interfaces), is not: it may be reachable from elsewhere."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def free_port() -> int:
    """A loopback port that was free a moment ago; the caller's child binds it right after.

    Another process can take it in between: the child then fails to bind and exits, which
    its supervisor reports with the child's log lines.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


ANY_ADDRESS = frozenset({"", "0.0.0.0", "::"})


def announced_host(bind: str, peer: str | None) -> str:
    """Where others reach a server listening on `bind`: `bind` itself; for an any-address
    bind, the address this host uses to reach `peer` (the cluster's Redis: the network the
    cluster shares), else the host name. Routing only: no packet is sent."""
    if bind not in ANY_ADDRESS:
        return bind
    if peer:
        try:
            family, _, _, _, addr = socket.getaddrinfo(peer, 9, type=socket.SOCK_DGRAM)[0]
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.connect(addr)
                return str(probe.getsockname()[0])
        except OSError:
            pass
    return socket.gethostname()

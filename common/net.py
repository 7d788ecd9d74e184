"""Addresses on this machine: whether a host is loopback-only, and a free loopback port for a
child server (llama-server, a test's Valkey)."""

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

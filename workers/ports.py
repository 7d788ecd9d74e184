"""Free loopback ports for the child servers a worker spawns (llama-server, test Redis)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A loopback port that was free a moment ago; the caller's child binds it right after.

    Another process can take it in between: the child then fails to bind and exits, which
    its supervisor reports with the child's log lines.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])

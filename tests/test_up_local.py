"""A newcomer's first hour with `corral up` (issue 24): every CLI command run on the same
machine, with no flag naming the cluster, finds the running `corral up` and authenticates as
its admin, also after `corral keys create` closed the gateway to callers without a key; the
local admin key is shown once and kept readable by its owner only; a later run says that
keys exist and prints a curl line that works."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from common import redis_keys
from common.net import free_port
from tests.support import env_without_corral, openai_client, wait_for

pytestmark = pytest.mark.slow  # every test here runs Corral processes

HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hi"}]


@dataclass
class Up:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    env: dict[str, str]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def corral(self, *args: str) -> subprocess.CompletedProcess[str]:
        """A CLI command as the user types it: no --redis-url, --config, --url nor key."""
        return subprocess.run(
            [sys.executable, "-m", "corral", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=self.env,
        )

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                return self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def start_up(home: Path, name: str) -> Up:
    """`corral up` with its default data dir (under `home`'s XDG_DATA_HOME), as typed."""
    port = free_port()
    env = {**env_without_corral(), "XDG_DATA_HOME": str(home), "CORRAL_PORT": str(port)}
    log = home / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "corral", "up"], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    up = Up(proc, port, log, {k: v for k, v in env.items() if k != "CORRAL_PORT"})
    if not wait_for(lambda: "Corral is up" in up.text() or proc.poll() is not None, 90, 0.2):
        up.stop()
        pytest.fail(up.text())
    assert proc.poll() is None, up.text()
    return up


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path


def check_cli_finds_the_cluster(up: Up) -> None:
    status = up.corral("status")
    assert status.returncode == 0, status.stderr
    assert "corral-demo" in status.stdout and "ready" in status.stdout
    models = up.corral("models", "list")
    assert models.returncode == 0 and "corral-demo-embed" in models.stdout, models.stderr
    estimate = up.corral("models", "estimate", "corral-demo")
    assert estimate.returncode == 0 and "measured" in estimate.stdout, estimate.stderr
    listed = up.corral("keys", "list")
    assert listed.returncode == 0, listed.stderr
    batches = up.corral("batches", "list")
    assert batches.returncode == 0 and "no batches" in batches.stderr, batches.stderr


def test_the_cli_finds_corral_up_and_its_admin_key_survives_user_keys(home: Path) -> None:
    up = start_up(home, "first")
    try:
        banner = up.text()
        data = home / "corral"
        key_file = data / "admin-key"
        admin = key_file.read_text().strip()
        assert key_file.stat().st_mode & 0o777 == 0o600
        assert admin in banner and "shown this once" in banner  # shown on the first run
        assert "corral keys admin" in banner and "redis:     redis://127.0.0.1:" in banner
        assert "Authorization" not in banner  # open on loopback: the curl line as it is
        assert up.corral("keys", "admin").stdout.strip() == admin

        # The README's snippet: no key needed until a user key exists.
        unused = openai_client(f"{up.base}/v1", timeout=30)
        assert unused.chat.completions.create(model="corral-demo", messages=HI, max_tokens=2)
        check_cli_finds_the_cluster(up)
        assert "no keys" in up.corral("keys", "list").stderr

        refused = up.corral("keys", "create", "--name", "typo", "--models", "no-such-model")
        assert refused.returncode == 1 and "unknown model(s) no-such-model" in refused.stderr
        assert "corral-demo" in refused.stderr  # what it knows instead
        made = up.corral("keys", "create", "--name", "ci", "--models", "corral-demo")
        assert made.returncode == 0, made.stderr
        user = made.stdout.strip()

        # Now the gateway wants a key; the CLI still gets in, as the admin.
        with pytest.raises(openai.AuthenticationError):
            unused.models.list()
        keyed = openai_client(f"{up.base}/v1", api_key=user, timeout=30)
        assert keyed.chat.completions.create(model="corral-demo", messages=HI, max_tokens=2)
        check_cli_finds_the_cluster(up)
        listed = up.corral("keys", "list")
        assert "name=ci" in listed.stdout and user not in listed.stdout
        metrics = httpx.get(f"{up.base}/metrics", headers={"Authorization": f"Bearer {admin}"})
        assert metrics.status_code == 200
        check_flower_finds_the_broker(up)
        assert up.stop() == 0
        workers = 3  # max_models_per_device on the CPU
        assert up.text().count("Warm shutdown") <= workers, up.text()[-3000:]

        gone = up.corral("status")  # nothing runs: it says where it looked
        assert gone.returncode == 1 and "cannot reach the gateway" in gone.stderr

        again = start_up(home, "second")  # the key persists with the data dir
        try:
            text = again.text()
            assert admin not in text  # shown once only
            assert "user keys exist" in text
            assert '-H "Authorization: Bearer $(corral keys admin)"' in text
            curl = subprocess.run(  # the banner's curl line, as a shell runs it
                ["sh", "-c", curl_line(text)],
                capture_output=True,
                text=True,
                timeout=60,
                env=again.env,
            )
            assert curl.returncode == 0 and '"chat.completion"' in curl.stdout, curl.stderr
            check_cli_finds_the_cluster(again)
        finally:
            again.stop()
    finally:
        up.stop()


def curl_line(banner: str) -> str:
    (line,) = [ln for ln in banner.splitlines() if ln.strip().startswith("try:")]
    command = line.split("try:", 1)[1].strip()
    corral = f"{sys.executable} -m corral"  # the CLI as this test runs it
    return command.replace("$(corral ", f"$({corral} ") + " --fail --silent --show-error"


def check_flower_finds_the_broker(up: Up) -> None:
    """`corral flower` with no broker flag: it lists the running models' queues."""
    port = free_port()
    env = {**up.env, "FLOWER_UNAUTHENTICATED_API": "true"}
    log = up.log.with_name("flower.log")
    with log.open("wb") as out:
        flower = subprocess.Popen(
            [sys.executable, "-m", "corral", "flower", "--unauthenticated", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:

        def queues() -> set[str]:
            try:
                reply = httpx.get(f"http://127.0.0.1:{port}/api/queues/length", timeout=2)
                return {q["name"] for q in reply.json()["active_queues"]}
            except (httpx.HTTPError, ValueError, KeyError):
                return set()

        wanted = set(redis_keys.worker_queues("corral-demo"))
        assert wait_for(lambda: wanted <= queues(), 30, 0.3), log.read_text()
    finally:
        flower.terminate()
        flower.wait(15)

"""The llama-server supervisor against the real binary and a generated tiny model."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from common.engines import EngineConfig
from common.errors import LlamaServerError
from corral.tinymodel import make_model
from tests.support import shell_script
from workers.engine.binary import cpu_threads, exit_reason, resolve_binary
from workers.engine.server import EngineServer, LaunchSpec, ServerState, _listens
from workers.hardware.cpus import usable_cpus

N_EMBD = 64


def _alive(pid: int) -> bool:
    """True while `pid` is a live (non-zombie) process."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _group_alive(pgid: int) -> bool:
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and _alive(proc.pid):
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("models")
    return {
        "chat": make_model(base / "chat.gguf", n_embd=N_EMBD),
        "embed": make_model(base / "embed.gguf", n_embd=N_EMBD, embedding=True),
    }


def _spec(model: Path, **kw: Any) -> LaunchSpec:
    args: dict[str, Any] = {"alias": "tiny", "ctx_size": 4096, "parallel": 2, **kw}
    return LaunchSpec(model_path=model, log_name="worker=test", **args)


@pytest.fixture(scope="module")
def chat_server(models: dict[str, Path]) -> Iterator[EngineServer]:
    with EngineServer(_spec(models["chat"])) as srv:
        srv.ensure_ready(30)
        yield srv


@pytest.fixture(scope="module")
def embed_server(models: dict[str, Path]) -> Iterator[EngineServer]:
    with EngineServer(_spec(models["embed"], alias="tiny-embed", embedding=True)) as srv:
        srv.ensure_ready(30)
        yield srv


def _sse_events(resp: httpx.Response) -> Iterator[dict[str, Any]]:
    for line in resp.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[len("data: ") :])


def test_ready_server_answers_health(chat_server: EngineServer) -> None:
    assert chat_server.state is ServerState.READY
    assert chat_server.base_url == f"http://127.0.0.1:{chat_server.port}"
    assert httpx.get(f"{chat_server.base_url}/health").status_code == 200
    metrics = httpx.get(f"{chat_server.base_url}/metrics")
    assert metrics.status_code == 200 and "llamacpp:" in metrics.text
    assert any("model loaded" in line for line in chat_server.last_log_lines(200))


def test_chat_completion(chat_server: EngineServer) -> None:
    body = {"model": "x", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}
    r = httpx.post(f"{chat_server.base_url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 200
    r.content.decode("utf-8")  # strict: raises on invalid UTF-8
    data = r.json()
    assert isinstance(data["choices"][0]["message"]["content"], str)
    assert data["usage"]["completion_tokens"] <= 16


def test_chat_completion_stream_is_utf8(chat_server: EngineServer) -> None:
    body = {
        "messages": [{"role": "user", "content": "hello world"}],
        "stream": True,
        "ignore_eos": True,
        "max_tokens": 32,
        "stream_options": {"include_usage": True},
    }
    url = f"{chat_server.base_url}/v1/chat/completions"
    with httpx.stream("POST", url, json=body, timeout=30) as resp:
        assert resp.status_code == 200
        raw = resp.read()
    raw.decode("utf-8")
    events = list(_sse_events(httpx.Response(200, content=raw)))
    text = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
    assert text
    usage = [e["usage"] for e in events if e.get("usage")]
    assert usage and usage[-1]["completion_tokens"] == 32


def test_completions(chat_server: EngineServer) -> None:
    body = {"prompt": "the model", "max_tokens": 16, "ignore_eos": True}
    r = httpx.post(f"{chat_server.base_url}/v1/completions", json=body, timeout=30)
    assert r.status_code == 200
    r.content.decode("utf-8")
    assert r.json()["usage"]["completion_tokens"] == 16


def test_slots_endpoint(chat_server: EngineServer) -> None:
    slots = httpx.get(f"{chat_server.base_url}/slots").json()
    assert len(slots) == 2
    assert {s["n_ctx"] for s in slots} == {2048}  # ctx_size is split over the slots


def _tokens_predicted(server: EngineServer) -> float:
    """llama-server's count of generated tokens of the requests that ran to their end."""
    metrics = httpx.get(f"{server.base_url}/metrics", timeout=5).text
    (line,) = [x for x in metrics.splitlines() if x.startswith("llamacpp:tokens_predicted_total")]
    return float(line.split()[1])


def test_client_disconnect_stops_generation(chat_server: EngineServer) -> None:
    body = {"prompt": "hello", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    url = f"{chat_server.base_url}/v1/completions"
    before = _tokens_predicted(chat_server)
    with httpx.stream("POST", url, json=body, timeout=30) as resp:
        for n, _ in enumerate(resp.iter_lines()):
            if n > 10:
                break
    closed = time.monotonic()
    while any(s["is_processing"] for s in httpx.get(f"{chat_server.base_url}/slots").json()):
        assert time.monotonic() - closed < 1.0, "llama-server kept generating after close"
        time.sleep(0.005)
    # Cut short, not finished: a fast CPU makes 1500 tokens within the second waited above.
    assert _tokens_predicted(chat_server) - before < 1500


def test_embeddings(embed_server: EngineServer) -> None:
    body = {"model": "tiny-embed", "input": ["hello world", "the queue"]}
    r = httpx.post(f"{embed_server.base_url}/v1/embeddings", json=body, timeout=30)
    assert r.status_code == 200
    data = r.json()["data"]
    assert len(data) == 2
    assert all(len(d["embedding"]) == N_EMBD for d in data)


def test_cpu_threads_unless_the_user_chose(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CPU worker's llama-server gets at most the CPUs but one; LLAMA_ARG_THREADS (the worker's
    environment or the spec's) is the user's choice and stands, and so do the model's
    flags, which come last."""
    monkeypatch.delenv("LLAMA_ARG_THREADS", raising=False)
    usable, physical = usable_cpus(), psutil.cpu_count(logical=False)
    assert 1 <= cpu_threads() == max(1, min(physical or usable, usable - 1))
    argv = EngineServer(_spec(models["chat"], cpu_threads=3, flags=("-t", "5"))).command()
    assert argv[argv.index("--threads") + 1] == "3" and argv[-2:] == ["-t", "5"]
    assert "--threads" not in EngineServer(_spec(models["chat"])).command()  # a GPU worker
    chosen = _spec(models["chat"], cpu_threads=3, env={"LLAMA_ARG_THREADS": "2"})
    assert "--threads" not in EngineServer(chosen).command()
    monkeypatch.setenv("LLAMA_ARG_THREADS", "2")
    assert "--threads" not in EngineServer(_spec(models["chat"], cpu_threads=3)).command()
    monkeypatch.delenv("LLAMA_ARG_THREADS")
    with EngineServer(_spec(models["chat"], cpu_threads=1)) as srv:  # llama-server takes it
        srv.ensure_ready(30)
        assert srv.pid is not None and "--threads" in psutil.Process(srv.pid).cmdline()


@pytest.mark.slow
def test_missing_model_fails_fast_with_log_lines(tmp_path: Path) -> None:
    srv = EngineServer(_spec(tmp_path / "nope.gguf"))
    srv.start()
    started = time.monotonic()
    with pytest.raises(LlamaServerError, match="before it was ready") as err:
        srv.ensure_ready(30)
    assert time.monotonic() - started < 5
    # the missing file is named whether or not llama.cpp's log thread wrote its lines in
    # time (the child's own log lines in the message: the SIGILL test below)
    assert "does not exist" in str(err.value) and "nope.gguf" in str(err.value)
    assert srv.state is ServerState.FAILED and srv.returncode not in (None, 0)
    srv.stop()
    assert srv.state is ServerState.STOPPED


@pytest.mark.slow
def test_illegal_instruction_names_the_cause(tmp_path: Path) -> None:
    """A build for another CPU dies of SIGILL while loading: the error says what to do."""
    fake = shell_script(tmp_path / "avx512-server", "echo 'loading model'\nkill -ILL $$\n")
    srv = EngineServer(_spec(tmp_path / "m.gguf", binary=fake))
    srv.start()
    with pytest.raises(LlamaServerError, match="SIGILL") as err:
        srv.ensure_ready(30)
    assert "CORRAL_LLAMA_SERVER" in str(err.value) and "loading model" in str(err.value)
    assert srv.returncode == -signal.SIGILL
    srv.stop()
    assert exit_reason(0) == "rc=0" and exit_reason(-signal.SIGSEGV) == "rc=-11 (SIGSEGV)"


@pytest.mark.slow
def test_llama_server_stop_during_start(models: dict[str, Path]) -> None:
    srv = EngineServer(_spec(models["chat"]))
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            srv.ensure_ready(30)
        except BaseException as exc:
            errors.append(exc)

    srv.start()
    waiter = threading.Thread(target=wait)
    waiter.start()
    pid = srv.pid
    assert pid is not None
    srv.stop()
    waiter.join(10)
    assert srv.state is ServerState.STOPPED
    assert len(errors) == 1 and isinstance(errors[0], LlamaServerError)
    assert not _alive(pid)
    srv.stop()  # idempotent
    with pytest.raises(LlamaServerError):
        srv.ensure_ready(1)


@pytest.mark.slow
def test_stop_kills_whole_group(models: dict[str, Path]) -> None:
    with EngineServer(_spec(models["chat"])) as srv:
        srv.ensure_ready(30)
        pid = srv.pid
        assert pid is not None and _alive(pid)
    assert srv.state is ServerState.STOPPED and srv.returncode is not None
    assert not _alive(pid) and not _group_alive(pid)


@pytest.mark.slow
def test_llama_server_ignores_sigterm_then_killed(tmp_path: Path) -> None:
    fake = shell_script(
        tmp_path / "stubborn-server", "trap '' TERM\nsleep 300 &\necho grandchild=$!\nwait\n"
    )
    srv = EngineServer(_spec(tmp_path / "m.gguf", binary=fake))
    srv.start()
    deadline = time.monotonic() + 5
    while not any(line.startswith("grandchild=") for line in srv.last_log_lines()):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    grandchild = int(srv.last_log_lines()[-1].split("=")[1])
    pid = srv.pid
    assert pid is not None
    started = time.monotonic()
    srv.stop(grace=0.5)
    assert 0.5 <= time.monotonic() - started < 3
    assert srv.returncode == -signal.SIGKILL
    assert _wait_gone(grandchild, 2) and not _alive(pid)


@pytest.mark.slow
def test_llama_server_child_dies_with_parent(models: dict[str, Path]) -> None:
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from workers.engine.server import LaunchSpec, EngineServer
        srv = EngineServer(LaunchSpec(Path({str(models["chat"])!r}), "tiny", 512, 1))
        srv.start()
        srv.ensure_ready(30)
        print(srv.pid, flush=True)
        time.sleep(120)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert _alive(child)
    finally:
        parent.kill()
        parent.wait()
        assert parent.stdout is not None
        parent.stdout.close()
    assert _wait_gone(child, 5), "llama-server outlived its SIGKILLed parent"


@pytest.mark.slow
def test_unspawnable_binary_raises(tmp_path: Path) -> None:
    srv = EngineServer(_spec(tmp_path / "m.gguf", binary=tmp_path / "no-such-binary"))
    with pytest.raises(LlamaServerError, match="cannot spawn"):
        srv.start()
    assert srv.state is ServerState.STOPPED and srv.pid is None


def test_resolve_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CORRAL_LLAMA_SERVER", raising=False)
    assert resolve_binary().is_file()
    with pytest.raises(LlamaServerError, match="not an executable"):
        resolve_binary(str(tmp_path / "missing"))
    fake = tmp_path / "llama-server"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CORRAL_LLAMA_SERVER", str(fake))
    assert resolve_binary() == fake


@pytest.mark.slow
def test_ready_means_our_child_holds_the_port(
    chat_server: EngineServer, models: dict[str, Path]
) -> None:
    """The port is chosen free but not held until llama-server binds it; a /health 200
    counts only if our child holds the listening socket (whatever took the port meanwhile
    would answer while our child, unable to bind, goes on loading)."""
    assert chat_server.pid is not None and chat_server.port is not None
    assert _listens(chat_server.pid, chat_server.port)
    with socket.socket() as squatter:  # another process's port, as seen from the child
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        assert _listens(os.getpid(), port)
        assert not _listens(chat_server.pid, port)


# -- other engines: the same supervisor, a command of their own ------------------------------


def _engine(binary: Path, *head: str, **fields: Any) -> EngineConfig:
    args = ["-m", "{model_path}", "--host", "{host}", "--port", "{port}", "--alias", "{alias}"]
    args += ["--ctx-size", "{ctx_size}", "--parallel", "{slots}"]
    return EngineConfig(command=[*head, str(binary), *args], **fields)


def test_engine_command_is_supervised_like_llama_server(models: dict[str, Path]) -> None:
    """llama-server given as an engine's command, readiness on another health path, the
    engine's env in the child's, the spec's env over it, and `flags` last."""
    engine = _engine(
        resolve_binary(),
        health="/v1/models",
        env={"CORRAL_TEST_ENGINE": "{alias}-{slots}", "CORRAL_TEST_GPU": "engine"},
        name="my-engine",
    )
    spec = _spec(models["chat"], engine=engine, flags=("-n", "3"), env={"CORRAL_TEST_GPU": "w"})
    with EngineServer(spec) as srv:
        srv.ensure_ready(30)
        assert srv.name == "my-engine" and srv.pid is not None
        argv = psutil.Process(srv.pid).cmdline()
        assert argv[argv.index("--port") + 1] == str(srv.port) and argv[-2:] == ["-n", "3"]
        assert "--no-webui" not in argv  # its command, not the built-in one
        env = psutil.Process(srv.pid).environ()
        assert env["CORRAL_TEST_ENGINE"] == "tiny-2" and env["CORRAL_TEST_GPU"] == "w"
        reply = httpx.post(
            f"{srv.base_url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        )
        assert reply.status_code == 200


def test_engine_listening_from_a_child_process_is_ready(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """An engine started by a launcher (a shell script, say) listens from a process of its
    own: that counts as ours; stopping the group takes both."""
    launcher = shell_script(tmp_path / "launch.sh", '"$@" &\nwait\n')
    spec = _spec(models["chat"], engine=_engine(resolve_binary(), str(launcher)))
    with EngineServer(spec) as srv:
        srv.ensure_ready(30)
        assert srv.pid is not None and srv.port is not None
        (server,) = psutil.Process(srv.pid).children()
        assert _listens(srv.pid, srv.port) and not _listens(srv.pid, srv.port + 1)
    assert _wait_gone(server.pid, 5) and _wait_gone(srv.pid, 5)


def test_engine_without_a_value_for_a_placeholder_fails_before_spawning(
    models: dict[str, Path],
) -> None:
    engine = EngineConfig(command=[str(resolve_binary()), "--mmproj", "{mmproj}"])
    srv = EngineServer(_spec(models["chat"], engine=engine))
    with pytest.raises(LlamaServerError, match=r"uses \{mmproj\}, which has no value"):
        srv.start()
    assert srv.state is ServerState.STOPPED and srv.pid is None


def test_default_engine_is_expanded_from_its_command(models: dict[str, Path]) -> None:
    srv = EngineServer(_spec(models["chat"], binary=Path("/opt/llama-server"), port=9))
    assert srv.command() == [
        "/opt/llama-server",
        "-m",
        str(models["chat"]),
        "--host",
        "127.0.0.1",
        "--port",
        "9",
        "--ctx-size",
        "4096",
        "--parallel",
        "2",
        "--alias",
        "tiny",
        "--metrics",
        "--slots",
        "--no-webui",
    ]

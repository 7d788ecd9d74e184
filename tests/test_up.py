"""`corral up` as a user runs it: demo models, an answer, then Ctrl-C leaves nothing behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from common.net import free_port
from tests.support import alive, descendants, env_without_corral, openai_client, wait_for
from workers.engine.binary import cpu_threads

pytestmark = pytest.mark.slow  # every test here runs Corral processes


def test_corral_up_serves_then_stops_cleanly_on_sigint(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "corral",
                "up",
                "--port",
                str(port),
                "--data-dir",
                str(tmp_path / "data"),
            ],
            # A CORRAL_* variable must not undo a flag in the children (it outranked the
            # run's config there: the gateway listened on CORRAL_PORT, `up` waited on --port).
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**env_without_corral(), "CORRAL_PORT": str(free_port())},
        )
    try:
        assert wait_for(lambda: "Corral is up" in log.read_text(), 90, 0.2), log.read_text()
        text = log.read_text()
        assert f"http://127.0.0.1:{port}/v1" in text
        assert "random-weight DEMO models" in text
        assert "curl " in text

        client = openai_client(f"http://127.0.0.1:{port}/v1")
        assert {m.id for m in client.models.list()} == {"corral-demo", "corral-demo-embed"}
        reply = client.chat.completions.create(
            model="corral-demo", messages=[{"role": "user", "content": "Hi"}], max_tokens=8
        )
        assert reply.choices[0].message.content is not None
        vec = client.embeddings.create(model="corral-demo-embed", input="hi").data[0].embedding
        assert len(vec) > 0

        second = subprocess.run(  # the same data dir: one Valkey file for two runs
            [
                sys.executable,
                "-m",
                "corral",
                "up",
                "--port",
                str(free_port()),
                "--data-dir",
                str(tmp_path / "data"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=env_without_corral(),
        )
        assert second.returncode == 1, second.stderr
        assert f"is in use by another corral up (pid {proc.pid})" in second.stderr

        family = descendants(proc.pid)
        names = {psutil.Process(p).name() for p in family if alive(p)}
        assert any("llama-server" in n for n in names), names
        assert any("valkey" in n for n in names), names
        if "LLAMA_ARG_THREADS" not in os.environ:  # CPU workers leave one core to Corral
            for pid in family:
                argv = psutil.Process(pid).cmdline() if alive(pid) else []
                if argv and "llama-server" in Path(argv[0]).name:
                    assert argv[argv.index("--threads") + 1] == str(cpu_threads()), argv

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=40) == 0, log.read_text()[-3000:]
        quiet = log.read_text()  # corral up prints its own summary: no Celery banner, and
        assert "[tasks]" not in quiet and "(prefork)" not in quiet  # no gguf writer notes
        assert "Writing the following files" not in quiet
        assert "SecurityWarning" not in quiet  # Celery's seven lines, as root: one of ours
        assert "pynvml" not in quiet  # the deprecated package warned at every start (issue 24)
        assert quiet.count("Warm shutdown") <= 3  # once per worker at most (issue 24)
        assert ("runs as root" in quiet) == (os.geteuid() == 0)
        assert wait_for(lambda: not any(alive(p) for p in family), 10), [
            (p, psutil.Process(p).cmdline()) for p in family if alive(p)
        ]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

"""The README's two quick-start commands, as a newcomer runs them (issue 24: a stock Debian
Python refused the first, and the second's `python` existed only in a virtual environment).

From a fresh copy of the clone (its tracked files), with the system's Python where it is the
same version as this suite's (`/usr/bin/python3`: a stock Debian's), in a fresh virtual
environment. Only to keep it quick, the new environment also sees the packages installed for
this suite (a `.pth` file written right after `python3 -m venv`), so pip installs Corral
alone and downloads nothing but its build backend. The first command ends in `corral up`:
the test waits for its banner, runs the README's Python snippet against it, and stops it
with Ctrl-C. The second runs as written but for its last word: the unit tests of one
package, not the whole suite (which is what runs this test).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from common.net import free_port
from tests.support import openai_client, wait_for

pytestmark = pytest.mark.slow  # it installs and runs Corral's processes

ROOT = Path(__file__).resolve().parents[1]
SYSTEM_PYTHON = Path("/usr/bin/python3")


def quick_start() -> list[str]:
    """The shell commands of the README's Quick start, in order."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", section, re.S)]


def test_the_first_command_makes_a_venv_and_the_second_runs_inside_it() -> None:
    first, second = quick_start()
    assert "\n" not in first and "\n" not in second  # one line each
    steps = first.split(" && ")
    assert steps[0] == "python3 -m venv .venv" and steps[1] == ". .venv/bin/activate"
    assert steps[-1] == "corral up" and any(s.startswith("pip install") for s in steps)
    assert second.startswith(". .venv/bin/activate && ")  # a new terminal: into the venv first
    assert "pip install -e '.[test]'" in second and second.endswith("python -m pytest")


def fresh_copy(dest: Path) -> Path:
    """The repository's tracked files, as a fresh clone of this commit has them."""
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True
    ).stdout
    for name in filter(None, listed.decode().split("\0")):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def python3() -> str:
    """A stock Debian's system Python, if it is this suite's version (the `.pth` below
    shares compiled packages between the two); else this suite's own interpreter."""
    if SYSTEM_PYTHON.exists():
        version = subprocess.run(
            [str(SYSTEM_PYTHON), "-c", "import sys; print(sys.version_info[:2])"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        if version == str(sys.version_info[:2]):
            return str(SYSTEM_PYTHON)
    return sys.executable


def shell_env(tmp: Path, data: Path) -> dict[str, str]:
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(python3())
    drop = ("CORRAL_", "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PIP_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    return {**env, "PATH": f"{bin_dir}:{env['PATH']}", "XDG_DATA_HOME": str(data)}


def see_installed_packages(venv: Path) -> None:
    (site,) = venv.glob("lib/python3*/site-packages")
    paths = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    (site / "zz-this-suites-packages.pth").write_text("\n".join(sorted(paths)) + "\n")


def test_the_readme_commands_from_a_fresh_clone_in_a_fresh_venv(tmp_path: Path) -> None:
    first, second = quick_start()
    clone = fresh_copy(tmp_path / "clone")
    data = tmp_path / "data"
    env = shell_env(tmp_path, data)
    make_venv, rest = first.split(" && ", 1)
    made = subprocess.run(
        ["bash", "-c", make_venv], cwd=clone, env=env, capture_output=True, text=True, timeout=60
    )
    assert made.returncode == 0, made.stderr
    see_installed_packages(clone / ".venv")

    port = free_port()
    log = tmp_path / "first.log"
    with log.open("wb") as out:
        up = subprocess.Popen(
            ["bash", "-c", rest],
            cwd=clone,
            env={**env, "CORRAL_PORT": str(port)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        served = wait_for(lambda: "Corral is up" in log.read_text() or up.poll() is not None, 90)
        assert served and up.poll() is None, log.read_text()[-4000:]
        corral = clone / ".venv" / "bin" / "corral"
        assert corral.exists() and str(clone) in corral.read_text()  # the venv's own
        client = openai_client(f"http://127.0.0.1:{port}/v1", timeout=30)  # the snippet
        chunks = client.chat.completions.create(
            model="corral-demo", messages=[{"role": "user", "content": "Hi"}], stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        pid = int((data / "corral" / "run" / "corral-up.lock").read_text())
        os.kill(pid, signal.SIGINT)  # Ctrl-C
        assert up.wait(40) == 0, log.read_text()[-4000:]
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()

    unit = (
        second.removesuffix("python -m pytest") + "python -m pytest -q -m 'not slow' tests/common"
    )
    ran = subprocess.run(
        ["bash", "-c", unit], cwd=clone, env=env, capture_output=True, text=True, timeout=100
    )
    assert ran.returncode == 0, (ran.stdout + ran.stderr)[-4000:]
    assert " passed" in ran.stdout
    where = subprocess.run(  # the copy's own code ran, not this checkout's
        ["bash", "-c", ". .venv/bin/activate && python -c 'import corral; print(corral.__file__)'"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert where.stdout.startswith(str(clone)), where

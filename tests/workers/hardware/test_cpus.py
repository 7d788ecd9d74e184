"""Units: the CPUs a worker may use, from its affinity and its cgroup's CPU quota, read from
fake /proc/self files and cgroup trees (v2, v1, nested, hybrid, none)."""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest

from workers.engine.binary import cpu_threads
from workers.hardware import cpus
from workers.hardware.cpus import cgroup_cpu_quota, usable_cpus


def _proc(tmp: Path, cgroup: str, mounts: list[tuple[str, Path, str, str]]) -> Path:
    """A fake /proc/self: `cgroup` as its cgroup file, `mounts` as (root, mount point,
    fstype, super options) lines of its mountinfo."""
    proc = tmp / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text(cgroup)
    lines = [
        f"{30 + i} 23 0:{28 + i} {root} {point} rw,relatime - {fstype} {fstype} {options}"
        for i, (root, point, fstype, options) in enumerate(mounts)
    ]
    (proc / "mountinfo").write_text("\n".join(lines) + "\n")
    return proc


def _write(directory: Path, **files: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name.replace("_", ".", 1)).write_text(text + "\n")


def test_v2_container_quota(tmp_path: Path) -> None:
    """`docker run --cpus 2.5` with a cgroup namespace: the container's cgroup is the mount."""
    mount = tmp_path / "cgroup"
    _write(mount, cpu_max="250000 100000")
    proc = _proc(tmp_path, "0::/\n", [("/", mount, "cgroup2", "rw")])
    assert cgroup_cpu_quota(proc) == 2.5


def test_v2_the_smallest_quota_of_the_ancestors_wins(tmp_path: Path) -> None:
    mount = tmp_path / "cgroup"
    _write(mount / "kubepods", cpu_max="100000 100000")
    _write(mount / "kubepods" / "pod1", cpu_max="max 100000")
    _write(mount, cpu_max="max 100000")
    proc = _proc(tmp_path, "0::/kubepods/pod1\n", [("/", mount, "cgroup2", "rw")])
    assert cgroup_cpu_quota(proc) == 1.0


def test_v1_quota_with_the_hosts_path_hidden(tmp_path: Path) -> None:
    """cgroup v1 without a cgroup namespace: /proc/self/cgroup names the host's path, and
    the container's cgroup is mounted at the controller's mount point."""
    mount = tmp_path / "cpu,cpuacct"
    _write(mount, cpu_cfs_quota_us="150000", cpu_cfs_period_us="100000")
    proc = _proc(
        tmp_path,
        "4:cpu,cpuacct:/docker/abc\n3:memory:/docker/abc\n0::/\n",
        [("/docker/abc", mount, "cgroup", "rw,cpu,cpuacct")],
    )
    assert cgroup_cpu_quota(proc) == 1.5


def test_no_quota_anywhere(tmp_path: Path) -> None:
    """Like this project's CI machine: v1 cpu unlimited, a cgroup2 mount without `cpu.max`,
    other controllers' mounts ignored."""
    cpu, unified, memory = tmp_path / "cpu", tmp_path / "unified", tmp_path / "memory"
    _write(cpu, cpu_cfs_quota_us="-1", cpu_cfs_period_us="100000")
    _write(unified)
    _write(memory, cpu_max="100000 100000")  # not a cpu mount: never read
    proc = _proc(
        tmp_path,
        "4:memory:/x\n1:cpu:/\n0::/\n",
        [
            ("/", cpu, "cgroup", "rw,cpu"),
            ("/", unified, "cgroup2", "rw"),
            ("/", memory, "cgroup", "rw,memory"),
        ],
    )
    assert cgroup_cpu_quota(proc) is None
    assert cgroup_cpu_quota(tmp_path / "no-such-proc") is None  # not Linux: no files


def test_usable_cpus_is_capped_by_the_quota_rounded_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    mount = tmp_path / "cgroup"
    _write(mount, cpu_max="250000 100000")
    proc = _proc(tmp_path, "0::/\n", [("/", mount, "cgroup2", "rw")])
    assert usable_cpus(proc) == 3
    _write(mount, cpu_max="50000 100000")
    assert usable_cpus(proc) == 1  # half a CPU is still one to run on
    _write(mount, cpu_max="max 100000")
    assert usable_cpus(proc) == 8


def test_cpu_threads_leave_one_of_the_quota(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker in a 3-CPU container on an 8-CPU host gives llama-server 2 threads, not 7."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 8)
    mount = tmp_path / "cgroup"
    _write(mount, cpu_max="300000 100000")
    proc = _proc(tmp_path, "0::/\n", [("/", mount, "cgroup2", "rw")])
    monkeypatch.setattr(cpus, "PROC_SELF", proc)
    assert cpu_threads() == 2


def test_cpu_threads_where_affinity_is_unknown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(os, "sched_getaffinity")  # not on every OS: every CPU counts
    monkeypatch.setattr(cpus, "PROC_SELF", tmp_path)  # and no cgroup files
    n, physical = os.cpu_count() or 1, psutil.cpu_count(logical=False)
    assert cpu_threads() == max(1, min(physical or n, n - 1))

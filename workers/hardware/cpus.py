"""How many CPUs this process may use: its affinity mask, capped by its cgroup's CPU quota.

A container started with `--cpus 4` (`deploy.resources.limits.cpus` in compose, a CPU limit
in Kubernetes) keeps every host CPU in its affinity mask and is throttled by a CFS quota
instead. Counting the mask alone, a CPU worker on a 64-core host would start llama-server
with dozens of threads spinning in a 4-CPU quota. cgroup v2 (`cpu.max`) and v1
(`cpu.cfs_quota_us` / `cpu.cfs_period_us`) are both read, on the process's own cgroup and
its ancestors up to the mount point: the smallest quota wins.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

PROC_SELF = Path("/proc/self")


def usable_cpus(proc: Path | None = None) -> int:
    """The CPUs in the affinity mask (every CPU where the OS has none), at most the cgroup
    quota rounded up, and at least one."""
    affinity = getattr(os, "sched_getaffinity", None)  # Linux; elsewhere every CPU
    usable = len(affinity(0)) if affinity else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota(proc)
    if quota is not None:
        usable = min(usable, math.ceil(quota))
    return max(1, usable)


def cgroup_cpu_quota(proc: Path | None = None) -> float | None:
    """The CPU quota, in CPUs, of this process's cgroup and its ancestors (v2 or v1); None
    when there is none or the cgroup files cannot be read (not Linux, no cgroup fs)."""
    proc = proc or PROC_SELF
    try:
        groups = _cgroup_paths((proc / "cgroup").read_text())
        mounts = (proc / "mountinfo").read_text().splitlines()
    except OSError:
        return None
    quotas: list[float] = []
    for line in mounts:
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        root, mountpoint, fstype = fields[3], Path(fields[4]), fields[sep + 1]
        options = fields[sep + 3].split(",") if len(fields) > sep + 3 else []
        if fstype == "cgroup2" and "" in groups:
            path = groups[""]
        elif fstype == "cgroup" and "cpu" in options and "cpu" in groups:
            path = groups["cpu"]
        else:
            continue
        for directory in _up_to_mount(mountpoint, root, path):
            if (quota := _quota_in(directory)) is not None:
                quotas.append(quota)
    return min(quotas, default=None)


def _cgroup_paths(text: str) -> dict[str, str]:
    """/proc/self/cgroup as {controller: path}; "" is the cgroup v2 (unified) hierarchy."""
    paths: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(",") if parts[1] else [""]:
                paths[controller] = parts[2]
    return paths


def _up_to_mount(mountpoint: Path, root: str, path: str) -> list[Path]:
    """The process's cgroup directory under `mountpoint`, then each parent up to it. A path
    outside the mount's root (a container whose cgroup namespace hides the host's path)
    leaves the mount point itself, which is then the container's cgroup."""
    inside = root == "/" or path == root or path.startswith(root.rstrip("/") + "/")
    relative = os.path.relpath(path, root) if inside else "."
    parts = [p for p in Path(relative).parts if p not in (".", "/")]
    return [mountpoint.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def _quota_in(directory: Path) -> float | None:
    """The quota set in one cgroup directory, in CPUs, or None (unlimited, or no files)."""
    try:
        quota, _, period = (directory / "cpu.max").read_text().partition(" ")  # v2
    except OSError:
        try:
            quota = (directory / "cpu.cfs_quota_us").read_text()  # v1
            period = (directory / "cpu.cfs_period_us").read_text()
        except OSError:
            return None
    try:
        q, p = int(quota), int(period)
    except ValueError:  # "max": no limit
        return None
    return q / p if q > 0 and p > 0 else None

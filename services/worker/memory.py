"""How much memory the worker uses of what it may use, and the high/low water-mark gate
that stops it taking work near the limit (seed 003).

The first source that knows a limit wins:

1. cgroup v2: `memory.current` / `memory.max` of the worker's own cgroup;
2. cgroup v1: `memory.usage_in_bytes` / `memory.limit_in_bytes` of its memory cgroup;
3. a configured budget (`memory_budget_mb`): the RSS of the worker and all its
   descendants (zygote, children, shell commands) against it;
4. the machine: MemTotal - MemAvailable of MemTotal (/proc/meminfo).

A cgroup counts the children and the page cache too, which the worker's own RSS would
miss. The budget sums each process's RSS, so pages a forked child shares with the
zygote count once per process: it errs high, which only closes the gate early.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_PAGE = os.sysconf("SC_PAGE_SIZE")
# The kernel's "no limit": cgroup v1 reports ~2**63 rounded to a page; v2 writes "max".
UNLIMITED = 2**62


@dataclass(frozen=True)
class MemorySample:
    used_bytes: int | None
    limit_bytes: int | None

    @property
    def ratio(self) -> float | None:
        if self.used_bytes is None or not self.limit_bytes:
            return None
        return self.used_bytes / self.limit_bytes


@dataclass(frozen=True)
class Host:
    """Where the kernel tells about memory (tests point these at files of their own)."""

    proc: Path = Path("/proc")
    cgroup: Path = Path("/sys/fs/cgroup")


HOST = Host()


def sample(budget_mb: int | None = None, *, host: Host = HOST,
           pid: int | None = None) -> MemorySample:
    """What process `pid` (default: this one) uses of the first limit that applies."""
    pid = os.getpid() if pid is None else pid
    return next((s for s in _sources(host, pid, budget_mb) if s is not None),
                MemorySample(None, None))


def _sources(host: Host, pid: int, budget_mb: int | None) -> Iterator[MemorySample | None]:
    """Each source in turn, read only if the ones before it know no limit."""
    yield _cgroup(host, pid, "", host.cgroup, "memory.current", "memory.max")
    yield _cgroup(host, pid, "memory", host.cgroup / "memory", "memory.usage_in_bytes",
                  "memory.limit_in_bytes")
    yield _budget(host, pid, budget_mb)
    yield _machine(host)


def _cgroup(host: Host, pid: int, controller: str, mount: Path, used_file: str,
            limit_file: str) -> MemorySample | None:
    """The usage and limit of the process's cgroup in one hierarchy; None without a limit.
    `controller` "" is cgroup v2's unified hierarchy (its line in /proc/PID/cgroup is
    `0::/path`)."""
    path = _cgroup_path(host, pid, controller)
    if path is None:
        return None
    # In a container without a cgroup namespace the path is the host's, and the
    # container's own cgroup is what is mounted: then the mount itself is the one.
    for directory in (mount / path.lstrip("/"), mount):
        used = _read_int(directory / used_file)
        if used is not None:
            limit = _read_int(directory / limit_file)
            return MemorySample(used, limit) if limit is not None and limit < UNLIMITED \
                else None
    return None


def _cgroup_path(host: Host, pid: int, controller: str) -> str | None:
    try:
        lines = (host.proc / str(pid) / "cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return path
    return None


def _budget(host: Host, pid: int, budget_mb: int | None) -> MemorySample | None:
    if budget_mb is None:
        return None
    used = sum(_rss(host, p) for p in _self_and_descendants(host, pid))
    return MemorySample(used, budget_mb * 2**20)


def _self_and_descendants(host: Host, pid: int) -> Iterator[int]:
    children: dict[int, list[int]] = defaultdict(list)
    for entry in host.proc.iterdir():
        if entry.name.isdigit():
            ppid = _parent(entry)
            if ppid is not None:
                children[ppid].append(int(entry.name))
    todo = [pid]
    while todo:
        p = todo.pop()
        yield p
        todo.extend(children.get(p, ()))


def _parent(process: Path) -> int | None:
    try:
        stat = (process / "stat").read_text()
    except OSError:  # it exited while we looked
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    return int(stat.rsplit(")", 1)[1].split()[1])


def _rss(host: Host, pid: int) -> int:
    try:
        return int((host.proc / str(pid) / "statm").read_text().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _machine(host: Host) -> MemorySample | None:
    try:
        lines = (host.proc / "meminfo").read_text().splitlines()
    except OSError:
        return None
    kib = {name: int(rest.split()[0]) for name, _, rest in
           (line.partition(":") for line in lines) if rest.strip()}
    if "MemTotal" not in kib or "MemAvailable" not in kib:
        return None
    return MemorySample((kib["MemTotal"] - kib["MemAvailable"]) * 1024, kib["MemTotal"] * 1024)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2's "max" is no limit


class MemoryGate:
    """Closes above the high-water mark and opens again only below the low one, so a
    worker near its mark does not flap between taking and refusing work."""

    def __init__(self, high_ratio: float, low_ratio: float) -> None:
        if not 0 < low_ratio < high_ratio <= 1:
            raise ValueError("need 0 < low_ratio < high_ratio <= 1")
        self._high = high_ratio
        self._low = low_ratio
        self.under_pressure = False

    def update(self, s: MemorySample) -> bool:
        """Feed a sample; return True when the gate changed state."""
        ratio = s.ratio
        before = self.under_pressure
        if ratio is None:
            self.under_pressure = False
        elif ratio >= self._high:
            self.under_pressure = True
        elif ratio <= self._low:
            self.under_pressure = False
        return before != self.under_pressure

"""CPU and memory of process trees, read from /proc, and stopping the trees we started.

A *group* is a root process and all its descendants. Its CPU over a run is the change
in utime+stime+cutime+cstime summed over the root and every live descendant: a child
that exits and is reaped moves its time into its parent's cutime/cstime, so nothing is
lost or counted twice. Its memory is the summed RSS of the tree, sampled every ~100 ms;
the peak is reported (shared pages, e.g. Postgres' shared buffers, count once per
process that touched them).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections import defaultdict
from dataclasses import dataclass

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
TOTAL = "total"


@dataclass(frozen=True)
class ProcStat:
    pid: int
    ppid: int
    started: int  # ticks after boot: tells a pid from a later process that reused it
    cpu_ticks: int  # utime + stime + cutime + cstime
    rss_bytes: int
    zombie: bool  # exited, not yet reaped: nothing left to stop


def _stat(pid: int) -> ProcStat | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:  # gone meanwhile
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its end.
    fields = data[data.rindex(b")") + 2:].split()
    return ProcStat(pid=pid, ppid=int(fields[1]), started=int(fields[19]),
                    cpu_ticks=sum(int(x) for x in fields[11:15]),
                    rss_bytes=int(fields[21]) * PAGE_SIZE, zombie=fields[0] == b"Z")


def process_table() -> dict[int, ProcStat]:
    """Every process on the machine, now."""
    table: dict[int, ProcStat] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (stat := _stat(int(name))) is not None:
            table[stat.pid] = stat
    return table


def tree(table: dict[int, ProcStat], root: int) -> list[ProcStat]:
    """The root and its live descendants ([] if the root is gone)."""
    if root not in table:
        return []
    children: dict[int, list[int]] = defaultdict(list)
    for stat in table.values():
        children[stat.ppid].append(stat.pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(table[pid])
        todo += children.get(pid, [])
    return found


def parent_of(pid: int) -> int | None:
    stat = _stat(pid)
    return None if stat is None else stat.ppid


@dataclass(frozen=True)
class Usage:
    """One group over one run."""

    cpu_ms: float
    peak_rss_bytes: int


class Meter:
    """CPU and peak RSS of named groups between start() and stop(), and of all of them
    together ("total": the peak of the sum, not the sum of the peaks). A thread samples
    every `interval_s`; it runs in the benchmark's own process, which is in no group."""

    def __init__(self, groups: dict[str, int], interval_s: float = 0.1) -> None:
        self._groups = groups
        self._interval_s = interval_s
        self._before: dict[str, int] = {}
        self._peak: dict[str, int] = dict.fromkeys([*groups, TOTAL], 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_stopped,
                                        name="bench-meter", daemon=True)

    def _sample(self) -> dict[str, int]:
        """One pass over /proc: each group's CPU ticks now; RSS peaks updated."""
        table = process_table()
        ticks, total_rss = {}, 0
        for name, root in self._groups.items():
            members = tree(table, root)
            ticks[name] = sum(p.cpu_ticks for p in members)
            rss = sum(p.rss_bytes for p in members)
            self._peak[name] = max(self._peak[name], rss)
            total_rss += rss
        self._peak[TOTAL] = max(self._peak[TOTAL], total_rss)
        return ticks

    def _sample_until_stopped(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._sample()

    def start(self) -> None:
        self._before = self._sample()
        self._thread.start()

    def stop(self) -> dict[str, Usage]:
        self._stop.set()
        self._thread.join()
        after = self._sample()
        usage = {name: Usage(cpu_ms=(after[name] - self._before[name]) * 1000 / CLOCK_TICKS,
                             peak_rss_bytes=self._peak[name])
                 for name in self._groups}
        usage[TOTAL] = Usage(cpu_ms=sum(u.cpu_ms for u in usage.values()),
                             peak_rss_bytes=self._peak[TOTAL])
        return usage


def stop_tree(popen: subprocess.Popen, grace_s: float) -> None:
    """Stop a process we started and everything under it: SIGTERM, SIGKILL after the
    grace, then SIGKILL whatever of its tree outlived it (by pid and start time, so a
    reused pid is never hit)."""
    members = [(p.pid, p.started) for p in tree(process_table(), popen.pid)][1:]
    if popen.poll() is None:
        popen.send_signal(signal.SIGTERM)
        try:
            popen.wait(grace_s)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(10)
    deadline = time.monotonic() + grace_s
    for pid, started in members:
        while (stat := _stat(pid)) is not None and stat.started == started and not stat.zombie:
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.05)

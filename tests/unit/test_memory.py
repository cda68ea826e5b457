"""The memory gate and each of its sources: cgroup v2, cgroup v1, a budget, the machine
(services/worker/memory.py), on files laid out as the kernel lays them out, and the
budget on real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.worker.memory import Host, MemoryGate, MemorySample, sample

MIB = 2**20
PAGE = os.sysconf("SC_PAGE_SIZE")
PID = 100
V1_UNLIMITED = "9223372036854771712"
MEMINFO = "MemTotal:       1000 kB\nMemFree:         100 kB\nMemAvailable:    250 kB\n"


def test_gate_closes_above_high_and_opens_only_below_low() -> None:
    gate = MemoryGate(high_ratio=0.8, low_ratio=0.6)
    limit = 1000
    assert not gate.update(MemorySample(700, limit))
    assert gate.update(MemorySample(850, limit)) and gate.under_pressure
    assert not gate.update(MemorySample(700, limit)) and gate.under_pressure  # hysteresis
    assert gate.update(MemorySample(500, limit)) and not gate.under_pressure


def test_no_limit_never_closes_the_gate() -> None:
    gate = MemoryGate(0.8, 0.6)
    gate.update(MemorySample(10**12, None))
    assert not gate.under_pressure


def test_gate_rejects_nonsense_marks() -> None:
    with pytest.raises(ValueError):
        MemoryGate(0.5, 0.7)


def fake_host(tmp: Path, files: dict[str, str], *, v2: str = "/", v1: str = "/") -> Host:
    """/proc and /sys/fs/cgroup under tmp: process PID in cgroup `v2` of the unified
    hierarchy and `v1` of the memory controller's, and `files` (paths under tmp)."""
    proc, cgroup = tmp / "proc", tmp / "cgroup"
    (proc / str(PID)).mkdir(parents=True)
    (proc / str(PID) / "cgroup").write_text(
        f"9:name=systemd:/\n4:memory:{v1}\n3:cpu,cpuacct:/\n0::{v2}\n")
    for path, text in files.items():
        (tmp / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp / path).write_text(text)
    return Host(proc=proc, cgroup=cgroup)


def test_cgroup_v2_limit_of_the_workers_own_cgroup_wins(tmp_path: Path) -> None:
    host = fake_host(tmp_path, {
        "cgroup/memory.current": "1\n", "cgroup/memory.max": "2\n",  # the root's: not ours
        "cgroup/kubepods/pod1/memory.current": "104857600\n",
        "cgroup/kubepods/pod1/memory.max": "419430400\n",
        "cgroup/memory/memory.usage_in_bytes": "1\n",
        "cgroup/memory/memory.limit_in_bytes": "2\n",
        "proc/meminfo": MEMINFO,
    }, v2="/kubepods/pod1")
    assert sample(host=host, pid=PID) == MemorySample(100 * MIB, 400 * MIB)
    assert sample(host=host, pid=PID).ratio == 0.25


def test_cgroup_v2_without_a_limit_falls_back_to_cgroup_v1(tmp_path: Path) -> None:
    host = fake_host(tmp_path, {
        "cgroup/memory.current": "5\n", "cgroup/memory.max": "max\n",
        "cgroup/memory/docker/abc/memory.usage_in_bytes": "300\n",
        "cgroup/memory/docker/abc/memory.limit_in_bytes": "1200\n",
        "proc/meminfo": MEMINFO,
    }, v1="/docker/abc")
    assert sample(host=host, pid=PID) == MemorySample(300, 1200)


def test_cgroup_v1_path_of_the_host_reads_the_containers_mount(tmp_path: Path) -> None:
    # No cgroup namespace: /proc says /docker/abc, the container sees its cgroup as root.
    host = fake_host(tmp_path, {
        "cgroup/memory/memory.usage_in_bytes": "300\n",
        "cgroup/memory/memory.limit_in_bytes": "600\n",
    }, v1="/docker/abc")
    assert sample(host=host, pid=PID) == MemorySample(300, 600)


def test_unlimited_cgroups_fall_back_to_the_budget(tmp_path: Path) -> None:
    # This machine's layout: v2 has no memory controller, v1's memory cgroup no limit.
    host = fake_host(tmp_path, {
        "cgroup/memory/user/1/memory.usage_in_bytes": "300\n",
        "cgroup/memory/user/1/memory.limit_in_bytes": V1_UNLIMITED + "\n",
        "proc/meminfo": MEMINFO,
        # PID, its child 101, its grandchild 102; 103 is someone else's
        **{f"proc/{pid}/stat": f"{pid} (py (x) y) S {ppid} 1 1 0" for pid, ppid in
           ((PID, 1), (101, PID), (102, 101), (103, 1))},
        **{f"proc/{pid}/statm": f"9999 {pages} 0 0 0 0 0" for pid, pages in
           ((PID, 10), (101, 20), (102, 30), (103, 1000))},
    }, v1="/user/1")
    assert sample(64, host=host, pid=PID) == MemorySample(60 * PAGE, 64 * MIB)


def test_without_cgroup_limit_or_budget_the_machine_is_the_limit(tmp_path: Path) -> None:
    host = fake_host(tmp_path, {
        "cgroup/memory/memory.usage_in_bytes": "300\n",
        "cgroup/memory/memory.limit_in_bytes": V1_UNLIMITED + "\n",
        "proc/meminfo": MEMINFO,
    })
    assert sample(host=host, pid=PID) == MemorySample(750 * 1024, 1000 * 1024)


def test_nothing_to_read_is_no_limit(tmp_path: Path) -> None:
    assert sample(host=Host(tmp_path / "proc", tmp_path / "cgroup"), pid=PID) == \
        MemorySample(None, None)


def test_the_budget_counts_real_descendants() -> None:
    before = sample(16_384)
    # A grandchild (sh forks it, as the zygote forks the python children) holding 200 MiB.
    hold = ("import sys; held = b'x' * (200 << 20); print('ready', flush=True); "
            "sys.stdin.read()")
    proc = subprocess.Popen(["sh", "-c", f'{sys.executable} -c "{hold}"; true'],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        during = sample(16_384)
    finally:
        proc.communicate("")
    after = sample(16_384)
    assert during.limit_bytes == 16_384 * MIB
    assert before.used_bytes is not None and during.used_bytes is not None
    assert during.used_bytes - before.used_bytes >= 200 * MIB
    assert after.used_bytes is not None and after.used_bytes < during.used_bytes - 150 * MIB

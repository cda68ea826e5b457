"""What every system's no-op task body does, and how the benchmark reads it back.

The body's one job is to say when it ran, at the same cost for every system: it appends
one fixed-size record (key, start, end; wall clock) with a single os.write to a file in
the directory named by BENCH_PROBE_DIR. Each process opens its own file on first use;
a process forked after that shares its parent's (O_APPEND keeps each record whole).
Standard library only: Vigil's zygote imports this module.
"""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

DIR_ENV = "BENCH_PROBE_DIR"
# The key of the one submission each run sends before it is measured.
WARM_UP_KEY = -1

_RECORD = struct.Struct("<qdd")  # key, start, end (time.time())
_fd: int | None = None


def record(key: int) -> None:
    """Call as the task body's first statement: its start is when the body began."""
    global _fd
    start = time.time()
    if _fd is None:
        path = os.path.join(os.environ[DIR_ENV], f"{os.getpid()}.rec")
        _fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(_fd, _RECORD.pack(key, start, time.time()))


@dataclass(frozen=True)
class Record:
    key: int
    start: float
    end: float


def count(directory: Path) -> int:
    """How many records there are (file sizes only: cheap enough to poll)."""
    total = 0
    for entry in os.scandir(directory):
        if entry.name.endswith(".rec"):
            total += entry.stat().st_size // _RECORD.size
    return total


def read(directory: Path) -> list[Record]:
    records: list[Record] = []
    for path in sorted(directory.glob("*.rec")):
        data = path.read_bytes()
        usable = len(data) - len(data) % _RECORD.size
        records += [Record(*fields) for fields in _RECORD.iter_unpack(data[:usable])]
    return records

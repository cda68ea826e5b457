"""Container memory from cgroup v2, with a high/low water-mark gate (seed 003).

memory.current counts the children and the page cache too, which the worker's own
RSS would miss. Outside a memory-limited cgroup the gate never closes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class MemorySample:
    used_bytes: int | None
    limit_bytes: int | None

    @property
    def ratio(self) -> float | None:
        if self.used_bytes is None or not self.limit_bytes:
            return None
        return self.used_bytes / self.limit_bytes


def sample(root: Path = CGROUP_ROOT) -> MemorySample:
    used = _read_int(root / "memory.current")
    limit = _read_int(root / "memory.max")  # "max" (no limit) reads as None
    return MemorySample(used, limit)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


class MemoryGate:
    """Closes above the high-water mark and opens again only below the low one."""

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

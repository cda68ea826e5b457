import pytest

from services.worker.memory import MemoryGate, MemorySample, sample


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


def test_sample_reads_cgroup_files(tmp_path) -> None:
    (tmp_path / "memory.current").write_text("1048576\n")
    (tmp_path / "memory.max").write_text("max\n")
    assert sample(tmp_path) == MemorySample(1048576, None)
    (tmp_path / "memory.max").write_text("4194304\n")
    assert sample(tmp_path).ratio == 0.25
    assert sample(tmp_path / "missing") == MemorySample(None, None)


def test_gate_rejects_nonsense_marks() -> None:
    with pytest.raises(ValueError):
        MemoryGate(0.5, 0.7)

"""Drills: real processes on the real servers, killed the way production kills them.

Each drill records its figures with `drill_report`; `make drills` (and any pytest run
that includes drills) prints them as one table at the end.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

_RESULTS: list[DrillResult] = []


@dataclass
class DrillResult:
    name: str
    passed: bool = False
    figures: dict[str, float | int | str] = field(default_factory=dict)


@pytest.fixture
def drill_report(request: pytest.FixtureRequest) -> Iterator[DrillResult]:
    result = DrillResult(request.node.name.removeprefix("test_"))
    yield result
    report = getattr(request.node, "rep_call", None)
    result.passed = bool(report and report.passed)
    _RESULTS.append(result)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
    return report


def pytest_terminal_summary(terminalreporter) -> None:
    if not _RESULTS:
        return
    columns = ["detection_s", "recovery_s", "lost", "duplicated"]
    width = max(len(r.name) for r in _RESULTS)
    tr = terminalreporter
    tr.section("drills")
    tr.write_line(f"{'drill':<{width}}  result  " + "  ".join(f"{c:>11}" for c in columns)
                  + "  other")
    for r in _RESULTS:
        cells = "  ".join(f"{r.figures.get(c, '-')!s:>11}" for c in columns)
        other = ", ".join(f"{k}={v}" for k, v in r.figures.items() if k not in columns)
        tr.write_line(f"{r.name:<{width}}  {'pass' if r.passed else 'FAIL':<6}  {cells}  {other}")

"""Figures across runs (median, min-max), the comparison table, bench/results/latest.json
and bench/RESULTS.md. The table is Markdown, printed as it is written."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
from collections import defaultdict
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.config import BenchSettings
from bench.workloads import RunResult, Workload
from tests.harness import REPO

BENCH = Path(__file__).resolve().parent
RESULTS_DIR = BENCH / "results"
RESULTS_MD = BENCH / "RESULTS.md"
VIGIL = "vigil"
GROUPS = ("executor", "worker", "postgres", "rabbitmq", "client", "total")


@dataclass(frozen=True)
class Row:
    workload: str
    key: str  # in RunResult.figures
    label: str
    ratio: bool  # a main figure: shown as Vigil ÷ each peer too


def rows(workloads: dict[str, Workload]) -> list[Row]:
    out: list[Row] = []
    for key in workloads:
        if key == "w2":
            out += [Row(key, "start_p50_ms", "submit → start p50, ms", True),
                    Row(key, "start_p99_ms", "submit → start p99, ms", True),
                    Row(key, "start_max_ms", "submit → start max, ms", True),
                    Row(key, "submits_per_s", "submits/s achieved", False)]
            continue
        out += [Row(key, "end_to_end_per_s", "end to end, executions/s", True),
                Row(key, "drain_per_s", "drain, executions/s", True),
                Row(key, "submits_per_s", "submits/s", True)]
        out += [Row(key, f"cpu_ms.{g}", f"CPU ms/execution: {g}", g == "total")
                for g in GROUPS]
        out += [Row(key, f"rss_mib.{g}", f"peak RSS MiB: {g}", g == "total") for g in GROUPS]
    return out


@dataclass(frozen=True)
class Stat:
    median: float
    low: float
    high: float
    runs: int


Summary = dict[str, dict[str, dict[str, Stat]]]  # system -> workload -> figure -> Stat


def summarise(results: list[RunResult]) -> Summary:
    values: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for r in results:
        if r.error is None:
            for key, value in r.figures.items():
                values[(r.system, r.workload, key)].append(value)
    summary: Summary = defaultdict(lambda: defaultdict(dict))
    for (system, workload, key), vs in values.items():
        summary[system][workload][key] = Stat(statistics.median(vs), min(vs), max(vs), len(vs))
    return summary


def number(value: float) -> str:
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 1:
        return f"{value:.1f}" if magnitude >= 10 else f"{value:.2f}"
    return f"{value:.2f}" if magnitude >= 0.1 else f"{value:.2g}"  # 0.45, 0.0041


def cell(stat: Stat | None, failed: bool) -> str:
    if stat is None:
        return "failed" if failed else "—"
    if stat.runs == 1:
        return number(stat.median)
    return f"{number(stat.median)} ({number(stat.low)}-{number(stat.high)})"


def ratio(vigil: Stat | None, peer: Stat | None) -> str:
    if vigil is None or peer is None or peer.median == 0:
        return ""
    r = vigil.median / peer.median
    return f"{r:.0f}x" if r >= 10 else (f"{r:.1f}x" if r >= 1 else f"{r:.2f}x")


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def comparison(results: list[RunResult], systems: list[str],
               workloads: dict[str, Workload]) -> str:
    """The one table: each system's figures, then Vigil ÷ each peer for the main ones."""
    summary = summarise(results)
    failed = {(r.system, r.workload) for r in results if r.error is not None}
    peers = [s for s in systems if s != VIGIL] if VIGIL in systems else []
    header = ["figure: median of runs (min-max)", *systems, *(f"Vigil ÷ {p}" for p in peers)]
    body: list[list[str]] = []
    current = None
    for row in rows(workloads):
        if row.workload != current:
            current = row.workload
            body.append([f"**{workloads[current].title}**"] + [""] * (len(header) - 1))
        stats = {s: summary.get(s, {}).get(row.workload, {}).get(row.key) for s in systems}
        if "." in row.key and all(v is None for v in stats.values()):
            continue  # a process group that none of these systems has
        cells = [cell(stats[s], (s, row.workload) in failed) for s in systems]
        ratios = [ratio(stats[VIGIL], stats[p]) if row.ratio else "" for p in peers]
        body.append([row.label, *cells, *ratios])
    return markdown_table(header, body)


def w5_table(figures: dict[str, Any]) -> str:
    """W5's own figures: {row: {column: value}} as a table, anything else as key/value."""
    if figures and all(isinstance(v, dict) for v in figures.values()):
        columns = list(dict.fromkeys(c for v in figures.values() for c in v))
        return markdown_table(["", *columns], [
            [str(k), *(fmt(v.get(c)) for c in columns)] for k, v in figures.items()])
    return markdown_table(["figure", "value"], [[str(k), fmt(v)] for k, v in figures.items()])


def fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return f"{value:,}" if isinstance(value, int) else number(value)


# ---- where and with what the run happened ------------------------------------------


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                  if line.startswith("model name")), platform.processor())
    meminfo = Path("/proc/meminfo").read_text().split()
    ram_kib = int(meminfo[meminfo.index("MemTotal:") + 1])
    return {"cpu": model, "cores": os.cpu_count(), "ram_gib": round(ram_kib / 2**20, 1),
            "kernel": platform.release()}


def git_revision() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              check=False).stdout.strip()

    revision = git("rev-parse", "--short", "HEAD") or "unknown"
    # The last run's RESULTS.md, about to be rewritten, is not a change to what is measured.
    changed = git("status", "--porcelain", "--", ".", f":!{RESULTS_MD.relative_to(REPO)}")
    return revision + (" with uncommitted changes" if changed else "")


def versions(postgres: str, rabbitmq: str) -> dict[str, str]:
    def installed(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {"python": platform.python_version(), "postgresql": postgres,
            "rabbitmq": rabbitmq, "celery": installed("celery"), "kombu": installed("kombu"),
            "dramatiq": installed("dramatiq"), "pika": installed("pika"),
            "vigil": git_revision()}


def command() -> str:
    """How this run was started, with the VIGIL_BENCH_* knobs that were set."""
    names = {f"VIGIL_BENCH_{name.upper()}" for name in BenchSettings.model_fields}
    knobs = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k in names]
    run = "make bench" if os.environ.get("MAKELEVEL") else ".venv/bin/python -m bench.run"
    return " ".join([*knobs, run])


# ---- the outputs ---------------------------------------------------------------------


@dataclass
class Report:
    started: datetime
    wall_s: float
    machine: dict[str, Any]
    versions: dict[str, str]
    command: str
    durability: str
    settings: dict[str, Any]
    systems: dict[str, str]  # name -> how it ran
    notes: list[str]
    results: list[RunResult]
    workloads: dict[str, Workload]
    w5: dict[str, Any] | None
    w5_error: str | None

    def markdown(self) -> str:
        m, v = self.machine, self.versions
        failures = [r for r in self.results if r.error is not None]
        parts = [
            "# Vigil and its peers: benchmark results",
            "",
            f"Generated by the benchmark on {self.started:%Y-%m-%d %H:%M} UTC "
            f"(the whole run took {self.wall_s / 60:.1f} min). Do not edit: "
            "`make bench` writes this file.",
            "",
            f"- **Command**: `{self.command}`",
            f"- **Machine**: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, "
            f"Linux {m['kernel']}",
            f"- **Versions**: Python {v['python']}, PostgreSQL {v['postgresql']}, "
            f"RabbitMQ {v['rabbitmq']}, Celery {v['celery']} (kombu {v['kombu']}), "
            f"Dramatiq {v['dramatiq']} (pika {v['pika']}), Vigil {v['vigil']}",
            f"- **Durability**: {self.durability}",
            "",
            "## Systems",
            "",
            *(f"- **{name}**: {how}" for name, how in self.systems.items()),
            "",
            "## Notes",
            "",
            *(f"- {note}" for note in self.notes),
            "",
            "## Results",
            "",
            comparison(self.results, list(self.systems), self.workloads),
            "",
        ]
        if self.w5 is not None or self.w5_error is not None:
            parts += ["## W5: Vigil's dispatch with many rows queued", "",
                      w5_table(self.w5) if self.w5 is not None else f"failed: {self.w5_error}",
                      ""]
        twice = [r for r in self.results if r.figures.get("duplicates")]
        if twice:
            parts += ["## Task bodies that ran more than once", ""]
            parts += [f"- {r.system} {r.workload} run {r.repetition + 1}: "
                      f"{r.figures['duplicates']:.0f} extra" for r in twice]
            parts.append("")
        if failures:
            parts += ["## Failed runs", ""]
            parts += [f"- {r.system} {r.workload} run {r.repetition + 1}: "
                      + (r.error or "").replace("\n", "\n  ") for r in failures]
            parts.append("")
        return "\n".join(parts)

    def json(self) -> dict[str, Any]:
        summary = summarise(self.results)
        return {
            "generated_at": self.started.isoformat(), "wall_s": round(self.wall_s, 1),
            "command": self.command, "machine": self.machine, "versions": self.versions,
            "durability": self.durability, "settings": self.settings,
            "systems": self.systems, "notes": self.notes,
            "summary": {s: {w: {k: asdict(stat) for k, stat in figures.items()}
                            for w, figures in by_workload.items()}
                        for s, by_workload in summary.items()},
            "runs": [asdict(r) for r in self.results],
            "w5": self.w5, "w5_error": self.w5_error,
        }

    def write(self) -> str:
        """Write latest.json and RESULTS.md; return the Markdown."""
        text = self.markdown()
        RESULTS_DIR.mkdir(exist_ok=True)
        data = json.dumps(self.json(), indent=2, default=str)  # W5 may return anything
        (RESULTS_DIR / "latest.json").write_text(data + "\n")
        RESULTS_MD.write_text(text)
        return text


def now() -> datetime:
    return datetime.now(UTC)

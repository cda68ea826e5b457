"""The workloads, and one measured run of one workload on one system.

A run: start the system fresh; start the client, which submits one warm-up task and
waits; once that task has run (so every process is up and working), take the "before"
CPU readings and let the client go; wait, by polling, until every task body has run and
the system says the run is complete; take the "after" readings; stop everything.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import probe
from bench.config import BenchSettings
from bench.procs import Meter, Usage
from bench.systems import LOG_TAIL_CHARS, RunFailed, System
from tests.harness import REPO

WARM_UP_TIMEOUT_S = 120
POLL_S = 0.1
MIB = 1024 * 1024


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    mode: str  # bench.client's
    n: int
    client_args: tuple[str, ...] = ()


def workloads(settings: BenchSettings) -> dict[str, Workload]:
    every = {
        "w1a": Workload("w1a", f"W1a: {settings.n:,} no-ops on one worker node, submitted "
                               "one call at a time", "one", settings.n),
        "w1b": Workload("w1b", f"W1b: {settings.n:,} no-ops on one worker node, submitted "
                               f"in batches of {settings.batch}", "batch", settings.n,
                        ("--batch", str(settings.batch))),
        "w2": Workload("w2", f"W2: {settings.latency_n:,} no-ops paced at "
                             f"{settings.latency_rate:g}/s, one at a time", "paced",
                       settings.latency_n, ("--rate", str(settings.latency_rate))),
    }
    return {key: every[key] for key in settings.workload_names if key in every}


@dataclass
class RunResult:
    system: str
    workload: str
    repetition: int
    wall_s: float = 0.0
    error: str | None = None
    figures: dict[str, float] = field(default_factory=dict)


class ClientProcess:
    """bench.client as a child process, driven over its stdin/stdout."""

    def __init__(self, proc: asyncio.subprocess.Process, out: Path, log: Path) -> None:
        self.proc = proc
        self.out = out
        self.log = log
        self.done = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, system: System, workload: Workload, workdir: Path) -> ClientProcess:
        out, log = workdir / "client.json", workdir / "client.log"
        with open(log, "wb") as stderr:  # noqa: ASYNC230 (a local file, opened once)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.client", system.client_target, workload.mode,
                str(workload.n), *workload.client_args, "--out", str(out),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=stderr,
                env=system.client_env(), cwd=REPO)
        return cls(proc, out, log)

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def _expect(self, word: str) -> None:
        assert self.proc.stdout is not None
        line = (await self.proc.stdout.readline()).decode().strip()
        if line != word:
            raise RunFailed(f"client said {line!r}, not {word!r}:\n"
                            f"{self.log.read_text(errors='replace')[-LOG_TAIL_CHARS:]}")

    async def ready(self) -> None:
        """Connected, and the warm-up was submitted."""
        try:
            await asyncio.wait_for(self._expect("ready"), WARM_UP_TIMEOUT_S)
        except TimeoutError:
            raise RunFailed(f"the client was not ready within {WARM_UP_TIMEOUT_S}s:\n"
                            f"{self.log.read_text(errors='replace')[-LOG_TAIL_CHARS:]}"
                            ) from None

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")

        async def await_done() -> None:
            await self._expect("done")
            self.done.set()

        self._reader = asyncio.create_task(await_done())

    def check(self) -> None:
        """Raise if the client failed (its reader task ended in an error)."""
        if self._reader is not None and self._reader.done():
            self._reader.result()

    def timings(self) -> dict:
        return json.loads(self.out.read_text())

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self.proc.returncode is None:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


async def poll(check: Callable[[], object], deadline: float, what: str) -> None:
    """Call check() (which raises on failure) every POLL_S until it is true."""
    while not check():
        if time.monotonic() > deadline:
            raise RunFailed(f"timed out waiting for {what}")
        await asyncio.sleep(POLL_S)


async def measure(system: System, workload: Workload, shared: dict[str, int],
                  workdir: Path, settings: BenchSettings) -> dict[str, float]:
    """One run; its figures. `shared`: the servers' process groups (name -> root pid)."""
    probe_dir = workdir / "probe"
    probe_dir.mkdir()
    client: ClientProcess | None = None
    meter: Meter | None = None
    try:
        await system.start(workdir, probe_dir)
        client = await ClientProcess.start(system, workload, workdir)
        await client.ready()

        def warmed_up() -> bool:
            system.check_alive()
            return probe.count(probe_dir) >= 1

        await poll(warmed_up, time.monotonic() + WARM_UP_TIMEOUT_S, "the warm-up task")
        groups = {**system.groups(), **shared, "client": client.pid}
        started = Meter(groups)
        started.start()
        meter = started
        client.go()
        records = await all_bodies_ran(system, client, probe_dir, workload.n, settings)
        deadline = time.monotonic() + settings.stall_s
        completed = await system.completed_at(records, deadline)
        await poll(lambda: client.check() or client.done.is_set(), deadline, "the client")
        usage, meter = meter.stop(), None
        return figures(workload, client.timings(), records, completed, usage)
    finally:
        if meter is not None:
            meter.stop()
        if client is not None:
            await client.stop()
        await system.stop()


async def all_bodies_ran(system: System, client: ClientProcess, probe_dir: Path, n: int,
                         settings: BenchSettings) -> list[probe.Record]:
    """Every key 0..n-1 has a record; fails if nothing new ran for settings.stall_s."""
    last_count, last_progress = -1, time.monotonic()
    while True:
        system.check_alive()
        client.check()
        count = probe.count(probe_dir)
        if count > last_count:
            last_count, last_progress = count, time.monotonic()
        if count >= n + 1:  # the warm-up too
            records = [r for r in probe.read(probe_dir) if r.key >= 0]
            if len({r.key for r in records}) == n:
                return records
        if time.monotonic() - last_progress > settings.stall_s:
            raise RunFailed(f"{system.name}: stuck at {max(0, count - 1)} of {n} task "
                            f"bodies for {settings.stall_s:g}s")
        await asyncio.sleep(POLL_S)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def figures(workload: Workload, timings: dict, records: list[probe.Record],
            completed: float, usage: dict[str, Usage]) -> dict[str, float]:
    """The run's figures, flat (name -> value), for medians across runs."""
    n = workload.n
    first_start: dict[int, float] = {}
    for r in records:
        first_start[r.key] = min(r.start, first_start.get(r.key, r.start))
    submit_span = timings["last_return"] - timings["first_submit"]
    out: dict[str, float] = {
        "end_to_end_s": completed - timings["first_submit"],
        "submits_per_s": n / submit_span,
        "duplicates": len(records) - n,
    }
    out["end_to_end_per_s"] = n / out["end_to_end_s"]
    out["drain_s"] = completed - min(first_start.values())
    out["drain_per_s"] = n / out["drain_s"]
    if "submit_times" in timings:
        waits = [first_start[key] - t for key, t in enumerate(timings["submit_times"])]
        out |= {"start_p50_ms": percentile(waits, 50) * 1000,
                "start_p99_ms": percentile(waits, 99) * 1000,
                "start_max_ms": max(waits) * 1000}
    for group, u in usage.items():  # the process groups and their total
        out[f"cpu_ms.{group}"] = u.cpu_ms / n
        out[f"rss_mib.{group}"] = u.peak_rss_bytes / MIB
    return out

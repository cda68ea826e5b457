"""`make bench`: Vigil and its peers (Celery, Dramatiq) side by side, in one run.

Every system runs the same no-op task on the same RabbitMQ, each run on a vhost of its
own (Vigil also on a database of its own, cloned from a migrated template on the bench
Postgres cluster, which must have production durability):

- W1a/W1b: 20,000 no-ops on one worker node, submitted one call at a time (W1a) or in
  batches of 500 (W1b): end to end, drain, submits/s, CPU per execution and peak RSS
  of each process group.
- W2: 2,000 no-ops paced at 200/s, one at a time: submit -> start latency.
- W5: Vigil's dispatch with 10k/100k/1M rows queued and with 1M finished (bench/w5.py),
  after the rest, in a table of its own.

Runs alternate between systems (vigil, celery, dramatiq, vigil, ...) so that drift on
the machine hits all alike; each workload runs VIGIL_BENCH_RUNS times (3), once only
where one run took a minute or more. Output: the table on stdout and in bench/RESULTS.md,
everything in bench/results/latest.json. The knobs are in bench/config.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from bench import report, w5
from bench.config import BenchSettings
from bench.servers import (
    PEER_USER,
    SERVER_ERRORS,
    TEMPLATE_DB,
    NotDurable,
    Postgres,
    RabbitMQ,
    Servers,
    ServersDown,
)
from bench.systems import PEERS, Peer, System, Vigil
from bench.workloads import RunResult, Workload, measure, workloads
from common.errors import describe

# How long a run waits for a server that is down (another engineer may restart it).
SERVER_WAIT_S = 300


@dataclass(frozen=True)
class BenchContext:
    """What W5 is given: the servers (the migrated template database `template` exists
    while it runs; bench.systems.Vigil starts a fresh Vigil on them), a scratch
    directory and the settings."""

    servers: Servers
    template: str
    workdir: Path
    settings: BenchSettings

    @property
    def postgres(self) -> Postgres:
        return self.servers.postgres

    @property
    def rabbitmq(self) -> RabbitMQ:
        return self.servers.rabbitmq


def say(message: str) -> None:
    print(f"bench: {message}", flush=True)


def make_system(name: str, bench: BenchContext) -> System:
    if name == report.VIGIL:
        return Vigil(bench.postgres, bench.rabbitmq, bench.settings.capacity)
    return Peer(PEERS[name], bench.rabbitmq)


def notes(settings: BenchSettings) -> list[str]:
    """How the comparison is made: what each figure means and what differs."""
    return [
        "Peers are configured as a new user would: no result backend, defaults "
        "otherwise. Changed: only the worker flags above and the broker URL (a vhost of "
        f"their own per run, user `{PEER_USER}`). Vigil runs with its default settings.",
        "Completion: for the peers, the end of the task body; for Vigil, the execution's "
        "terminal state committed in Postgres (max(finished_at)), which is stricter.",
        "End to end: first submit → last completion. Drain: first task start → last "
        "completion. Submits/s: N ÷ (first submit → last submit call returned).",
        "Submitting: Vigil's submit returns after a durable COMMIT in Postgres (fsync). "
        "Celery's `delay()` and Dramatiq's `send()` return once the message is handed to "
        "the socket, without publisher confirms (their default), so a broker crash may "
        "lose it.",
        f"Batches of {settings.batch}: Vigil `AsyncClient.submit_many` (one transaction "
        "per batch); Celery `group(noop.s(k) for k in batch).apply_async()`; Dramatiq "
        "`group(noop.message(k) for k in batch).run()` (both publish each message on one "
        "connection).",
        "Start (W2): the wall clock at the task body's first statement, in the process "
        "that runs it; submit: the client's `time.time()` just before the submit call. "
        "The task body appends one 24-byte record with os.write, for every system.",
        "CPU: user+system time of each process tree (the root, its live descendants and "
        "the children they reaped) from the client's first submit to completion, ÷ N. "
        "Groups: executor and worker (Vigil's processes; a peer's worker invocation), "
        "postgres (the bench cluster's postmaster tree, Vigil only), rabbitmq (beam.smp "
        "tree), client (the submitting process). RSS: the tree's summed RSS sampled every "
        "100 ms, peak; total is the peak of the sum. Shared pages count once per process.",
        "The client is a process of its own (python -m bench.client); each run starts "
        "fresh processes and waits for one warm-up task to run before it is measured.",
        "RabbitMQ, the bench Postgres and the machine may be shared with other work "
        "while the benchmark runs: its load shows in the figures, most in those servers' "
        "CPU.",
        f"Cells: median of the runs (min-max), {settings.runs} runs of each workload "
        f"and system, only one where a run took {settings.repeat_under_s:g} s or more. "
        "Vigil ÷ peer: above 1, Vigil's figure is the larger.",
    ]


async def run_one(name: str, workload: Workload, repetition: int,
                  bench: BenchContext) -> tuple[RunResult, bool]:
    """One run, and whether it failed while a server restarted (so it may run again)."""
    await bench.servers.ready(SERVER_WAIT_S)
    pids = bench.servers.pids()
    system = make_system(name, bench)
    shared = {"rabbitmq": bench.rabbitmq.beam_pid}
    if system.uses_postgres:
        shared["postgres"] = bench.postgres.postmaster_pid
    run_dir = Path(tempfile.mkdtemp(prefix=f"{repetition + 1}-{workload.key}-{name}-",
                                    dir=bench.workdir))
    result = RunResult(name, workload.key, repetition)
    began = time.monotonic()
    try:
        result.figures = await measure(
            system, workload, {k: v for k, v in shared.items() if v is not None}, run_dir,
            bench.settings)
    except Exception as exc:  # reported with the results; the other runs go on
        result.error = f"{type(exc).__name__}: {exc}"
    result.wall_s = time.monotonic() - began
    if result.error is None:
        return result, False
    await bench.servers.ready(SERVER_WAIT_S)
    return result, bench.servers.pids() != pids


def progress(result: RunResult) -> str:
    f = result.figures
    head = f"{result.workload} {result.system} run {result.repetition + 1}:"
    if result.error is not None:
        return f"{head} FAILED ({result.wall_s:.0f} s): {result.error}"
    if "start_p50_ms" in f:
        body = (f"submit → start p50 {f['start_p50_ms']:.1f} ms, p99 "
                f"{f['start_p99_ms']:.1f} ms, max {f['start_max_ms']:.1f} ms")
    else:
        body = (f"end to end {f['end_to_end_s']:.1f} s ({f['end_to_end_per_s']:,.0f}/s), "
                f"drain {f['drain_per_s']:,.0f}/s, submits {f['submits_per_s']:,.0f}/s, "
                f"CPU {f['cpu_ms.total']:.2f} ms/execution")
    return f"{head} {body} (wall {result.wall_s:.0f} s)"


async def run_all(bench: BenchContext, chosen: dict[str, Workload]) -> list[RunResult]:
    """Every run, alternating systems within each workload and repetition."""
    settings = bench.settings
    results: list[RunResult] = []
    once: set[tuple[str, str]] = set()  # slow or failed: not run again
    for repetition in range(settings.runs):
        for workload in chosen.values():
            for name in settings.system_names:
                if repetition > 0 and (name, workload.key) in once:
                    continue
                result, restarted = await run_one(name, workload, repetition, bench)
                if restarted:
                    say(f"{progress(result)}; a server restarted meanwhile: running it again")
                    result, _ = await run_one(name, workload, repetition, bench)
                results.append(result)
                say(progress(result))
                if result.error is not None or result.wall_s >= settings.repeat_under_s:
                    once.add((name, workload.key))
    return results


async def run_w5(bench: BenchContext) -> tuple[dict[str, Any] | None, str | None]:
    """W5's figures if it was chosen: (figures, error)."""
    if "w5" not in bench.settings.workload_names:
        return None, None
    say("W5: Vigil's dispatch with many rows queued (bench/w5.py)")
    try:
        return await w5.run(bench), None
    except Exception as exc:  # reported; the rest of the results stand
        return None, f"{type(exc).__name__}: {exc}"


async def main() -> int:
    try:
        settings = BenchSettings()
    except ValidationError as exc:
        error = exc.errors()[0]
        print(f"bench: VIGIL_BENCH_{str(error['loc'][0]).upper()}: {error['msg']}",
              file=sys.stderr)
        return 2
    try:
        servers = await Servers.open()
    except (NotDurable, *SERVER_ERRORS) as exc:
        print(f"bench: {describe(exc)}", file=sys.stderr)
        return 1
    postgres, rabbitmq = servers.postgres, servers.rabbitmq
    chosen = workloads(settings)
    started, began = report.now(), time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vigil-bench-") as tmp:
        bench = BenchContext(servers, TEMPLATE_DB, Path(tmp), settings)
        systems = {name: make_system(name, bench).describe()
                   for name in settings.system_names}
        say(postgres.describe())
        say(f"RabbitMQ {rabbitmq.version} at {rabbitmq.settings.address}, a vhost per run")
        for server, pid in (("Postgres", postgres.postmaster_pid),
                            ("RabbitMQ", rabbitmq.beam_pid)):
            if pid is None:
                say(f"{server} runs elsewhere: its CPU and memory are not measured")
        for name, how in systems.items():
            say(f"{name}: {how}")
        try:
            await rabbitmq.create_peer_user()
            await postgres.create_template()
            results = await run_all(bench, chosen)
            w5, w5_error = await run_w5(bench)
        except (ServersDown, NotDurable) as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 1
        finally:
            await remove_everything(servers)
    text = report.Report(
        started=started, wall_s=time.monotonic() - began, machine=report.machine(),
        versions=report.versions(postgres.version, rabbitmq.version),
        command=report.command(), durability=postgres.describe(),
        settings=settings.model_dump(), systems=systems, notes=notes(settings),
        results=results, workloads=chosen, w5=w5, w5_error=w5_error,
    ).write()
    print("\n" + text)
    say(f"wrote {report.RESULTS_MD.relative_to(report.REPO)} and "
        f"{(report.RESULTS_DIR / 'latest.json').relative_to(report.REPO)}")
    return 1 if any(r.error is not None for r in results) else 0


async def remove_everything(servers: Servers) -> None:
    """The vhosts, user and databases the benchmark created, even after a failed run
    (waiting a little for a server that is restarting)."""
    with contextlib.suppress(ServersDown, NotDurable):
        await servers.ready(60)
    for failure in await servers.remove_leftovers():
        print(f"bench: could not remove {failure}", file=sys.stderr)


async def stoppable(work: Any) -> int:
    """Run `work`; SIGTERM cancels it like Ctrl-C does, so every cleanup still runs."""
    task = asyncio.ensure_future(work)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await task
    except asyncio.CancelledError:
        print("bench: stopped; everything it started was stopped and removed",
              file=sys.stderr)
        return 143


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(asyncio.run(stoppable(main())))
    sys.exit(130)

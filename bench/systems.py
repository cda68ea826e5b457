"""One driver per system behind one interface: start it fresh for a run (its own vhost,
for Vigil also its own database), say how its client connects, tell when the run has
completed, and remove everything again.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from bench import probe
from bench.peers import BROKER_URL_ENV
from bench.procs import stop_tree
from bench.servers import Postgres, RabbitMQ, unique_name
from common import db
from common.config import ExecutorSettings, WorkerSettings
from common.state_machine import TERMINAL
from tests.harness import FAST_TIMINGS, REPO, Env, Proc

STOP_GRACE_S = 15
LOG_TAIL_CHARS = 2000


class RunFailed(Exception):
    """The system did not do the run's work; the benchmark reports it and goes on."""


class System(ABC):
    """One system under test, started from scratch for each run."""

    name: str
    uses_postgres: bool = False
    client_target: str  # what bench.client imports

    def __init__(self) -> None:
        self.procs: list[Proc] = []

    @abstractmethod
    def describe(self) -> str:
        """How it runs, in one line for the output."""

    @abstractmethod
    async def start(self, workdir: Path, probe_dir: Path) -> None:
        """Create its vhost (and database) and start its processes."""

    @abstractmethod
    def client_env(self) -> dict[str, str]:
        """The environment of this run's submitting client."""

    @abstractmethod
    async def completed_at(self, records: list[probe.Record], deadline: float) -> float:
        """Wall-clock time of the last completion, once every task body has run."""

    @abstractmethod
    async def cleanup(self) -> None:
        """Remove what start() created on the servers (after the processes stopped)."""

    def groups(self) -> dict[str, int]:
        """Process groups to measure: group name -> root pid."""
        return {p.name: p.pid for p in self.procs}

    def check_alive(self) -> None:
        for p in self.procs:
            if p.popen.poll() is not None:
                raise RunFailed(f"{self.name} {p.name} exited with {p.popen.returncode}:\n"
                                f"{p.log()[-LOG_TAIL_CHARS:]}")

    async def stop(self) -> None:
        """Stop every process it started (and their children), then clean up."""
        try:
            await asyncio.gather(*(asyncio.to_thread(stop_tree, p.popen, STOP_GRACE_S)
                                   for p in self.procs))
        finally:
            await self.cleanup()


def spawn(name: str, argv: list[str], env: dict[str, str], workdir: Path) -> Proc:
    """Start a process, its output to <workdir>/<name>.log (as harness.Env.start does)."""
    log_path = workdir / f"{name}.log"
    with open(log_path, "wb") as log:
        popen = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, cwd=REPO)
    return Proc(name, popen, log_path)


def production_timings() -> dict[str, str]:
    """harness.Env applies the tests' shortened deadlines (FAST_TIMINGS); the benchmark
    runs Vigil with its defaults, so it sets each of those variables back."""
    classes = {"VIGIL_WORKER_": WorkerSettings, "VIGIL_EXECUTOR_": ExecutorSettings}
    timings = {}
    for var in FAST_TIMINGS:
        prefix = next(p for p in classes if var.startswith(p))
        timings[var] = str(classes[prefix].model_fields[var[len(prefix):].lower()].default)
    return timings


class Vigil(System):
    """One `vigil executor` and one `vigil worker --runtime python --actions
    bench.actions`, on a database cloned from the migrated template and a vhost
    provisioned as `vigil broker setup` does."""

    name = "vigil"
    uses_postgres = True
    client_target = "vigil"

    def __init__(self, pg: Postgres, rabbit: RabbitMQ, capacity: int) -> None:
        super().__init__()
        self._pg = pg
        self._rabbit = rabbit
        self._capacity = capacity
        self._name: str | None = None  # of its database and vhost
        self._env: Env | None = None
        self._pool: asyncpg.Pool | None = None

    def describe(self) -> str:
        return (f"one `vigil executor` + one `vigil worker --capacity {self._capacity} "
                "--runtime python --actions bench.actions`, default settings")

    async def start(self, workdir: Path, probe_dir: Path) -> None:
        name = self._name = unique_name("bench_vigil")
        await self._pg.create_database(name)
        env = self._env = Env(
            name=name, db=self._pg.database(name),
            broker=await self._rabbit.provision_vigil_vhost(name), tmp=workdir,
            extra_env={**production_timings(), probe.DIR_ENV: str(probe_dir)})
        self._pool = await db.connect(env.db.model_copy(update={"pool_max_size": 2}),
                                      application_name="vigil-bench")
        self.procs.append(env.start("executor", "--name", "bench", name="executor"))
        self.procs.append(env.start(
            "worker", "--name", "bench", "--capacity", str(self._capacity),
            "--runtime", "python", "--actions", "bench.actions", name="worker"))

    def client_env(self) -> dict[str, str]:
        assert self._env is not None
        return self._env.environ()

    async def completed_at(self, records: list[probe.Record], deadline: float) -> float:
        """Stricter than the peers' end of the task body: the last terminal state
        committed in Postgres (max(finished_at))."""
        assert self._pool is not None
        while True:
            rows = await self._pool.fetch(
                "SELECT status, count(*) AS n, extract(epoch FROM max(finished_at)) AS last "
                "FROM executions GROUP BY status")
            counts = {r["status"]: r["n"] for r in rows}
            if all(status in TERMINAL for status in counts):
                if set(counts) != {"SUCCEEDED"}:
                    raise RunFailed(f"vigil: executions ended {counts}")
                return float(next(r["last"] for r in rows))
            if time.monotonic() > deadline:
                raise RunFailed(f"vigil: timed out with executions {counts}")
            self.check_alive()
            await asyncio.sleep(0.1)

    async def cleanup(self) -> None:
        if self._pool is not None:
            await self._pool.close()
        if self._name is not None:  # both removals tolerate what was never created
            await self._rabbit.delete_vhost(self._name)
            await self._pg.drop_database(self._name)


@dataclass(frozen=True)
class PeerSpec:
    name: str
    app: str  # module with the task, send_one and send_batch (bench/peers/)
    worker: tuple[str, ...]  # the worker's command line, run as `python -m ...`
    remark: str = ""


PEERS = {
    spec.name: spec for spec in (
        PeerSpec("celery-threads", "bench.peers.celery_app",
                 ("celery", "-A", "bench.peers.celery_app", "worker", "-P", "threads",
                  "-c", "8")),
        PeerSpec("celery-prefork", "bench.peers.celery_app",
                 ("celery", "-A", "bench.peers.celery_app", "worker", "-c", "2"),
                 " (prefork, Celery's default pool)"),
        PeerSpec("dramatiq", "bench.peers.dramatiq_app",
                 ("dramatiq", "bench.peers.dramatiq_app", "--processes", "2",
                  "--threads", "4")),
    )
}


class Peer(System):
    """A peer's worker on a vhost of its own; a run completes with its last task body."""

    def __init__(self, spec: PeerSpec, rabbit: RabbitMQ) -> None:
        super().__init__()
        self.spec = spec
        self.name = spec.name
        self.client_target = spec.app
        self._rabbit = rabbit
        self._vhost: str | None = None
        self._env: dict[str, str] = {}

    def describe(self) -> str:
        return f"`{' '.join(self.spec.worker)}`{self.spec.remark}"

    async def start(self, workdir: Path, probe_dir: Path) -> None:
        self._vhost = unique_name(f"bench_{self.name.replace('-', '_')}")
        url = await self._rabbit.create_peer_vhost(self._vhost)
        self._env = {**os.environ, BROKER_URL_ENV: url, "PYTHONPATH": str(REPO)}
        self.procs.append(spawn("worker", [sys.executable, "-m", *self.spec.worker],
                                {**self._env, probe.DIR_ENV: str(probe_dir)}, workdir))

    def client_env(self) -> dict[str, str]:
        return self._env

    async def completed_at(self, records: list[probe.Record], deadline: float) -> float:
        return max(r.end for r in records)

    async def cleanup(self) -> None:
        if self._vhost is not None:
            await self._rabbit.delete_vhost(self._vhost)

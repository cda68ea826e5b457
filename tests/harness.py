"""Test harness: one database and one vhost per test, and real service processes.

The servers are the ones `make up` started (scripts/stack.py); each test gets its own
database, cloned from a migrated template, and its own RabbitMQ vhost, so tests never
see each other's rows or queues.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from common import broker, broker_access, db
from common.client import AsyncClient
from common.config import BrokerRole, BrokerSettings, DatabaseSettings
from common.db import workers
from common.errors import BrokerRefused
from common.models import WorkerStatus
from common.state_machine import TERMINAL, ExecutionStatus
from common.submission import Submission

REPO = Path(__file__).resolve().parent.parent
def _template_name() -> str:
    """The template is named for the migrations it was built from: a session never
    clones one built from other migrations, nor rebuilds one another session clones."""
    from common.db.migrate import available

    digest = hashlib.sha256(b"".join(path.read_bytes() for _, _, path in available()))
    return f"vigil_template_{digest.hexdigest()[:12]}"


TEMPLATE_DB = _template_name()
# Serialises building the template between concurrent test sessions.
_TEMPLATE_LOCK_KEY = 0x5649_4754  # "VIGT"

# Deadlines shortened for tests, so that failure handling shows within seconds.
FAST_TIMINGS = {
    "VIGIL_WORKER_HEARTBEAT_INTERVAL_S": "1",
    "VIGIL_EXECUTOR_HEARTBEAT_INTERVAL_S": "1",
    "VIGIL_EXECUTOR_DISPATCH_POLL_INTERVAL_S": "0.5",
    "VIGIL_EXECUTOR_MONITOR_INTERVAL_S": "0.5",
    "VIGIL_WORKER_RETRY_BASE_DELAY_S": "0.1",
    "VIGIL_WORKER_RETRY_MAX_DELAY_S": "0.5",
    "VIGIL_WORKER_SHUTDOWN_GRACE_S": "10",
    "VIGIL_WORKER_STARTUP_JITTER_S": "0",
    "VIGIL_EXECUTOR_STARTUP_JITTER_S": "0",
}


async def wait_until(
    check: Callable[[], Awaitable[Any]], *, timeout: float, interval: float = 0.1,
    what: str | Callable[[], str] = "condition",
) -> Any:
    """Poll `check` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            described = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout}s waiting for {described}")
        await asyncio.sleep(interval)


def management(path: str, method: str = "GET", body: Any = None) -> Any:
    """Call the RabbitMQ management API as the admin user."""
    return broker.management_api(BrokerSettings(), path, method=method, body=body)


def get(port: int, path: str) -> tuple[int, str]:
    """GET a service's /metrics or /healthz: (status, body), or (0, "") if it is not up."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one series in Prometheus text format, or None."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        if series == name or (want and series.startswith(name + "{") and all(
                f'{k}="{v}"' in series for k, v in labels.items())):
            return float(value)
    return None


async def scrape_until(port: int, check: Callable[[str], Any], what: str) -> str:
    """Scrape /metrics until `check` passes on the text; return that text."""
    async def ready() -> str | None:
        status, text = await asyncio.to_thread(get, port, "/metrics")
        return text if status == 200 and check(text) else None

    return await wait_until(ready, timeout=30, interval=0.2, what=what)


@dataclass
class Proc:
    """A service process started by a test."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def signal(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, grace: float) -> None:
        """Stop it as an operator would: SIGTERM, then SIGKILL after `grace` seconds."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.stop()

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGCONT)
            self.popen.kill()
            self.popen.wait(10)


def _metrics(port: int | None) -> list[str]:
    return [] if port is None else ["--metrics-port", str(port)]


@dataclass
class Env:
    """One test's database, vhost and processes."""

    name: str
    db: DatabaseSettings
    broker: BrokerSettings
    tmp: Path
    pool: asyncpg.Pool | None = None
    procs: list[Proc] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)

    def environ(self, **overrides: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("VIGIL_")}
        env.update({
            "VIGIL_DB_HOST": self.db.host, "VIGIL_DB_PORT": str(self.db.port),
            "VIGIL_DB_USER": self.db.user,
            "VIGIL_DB_PASSWORD": self.db.password.get_secret_value(),
            "VIGIL_DB_NAME": self.db.name,
            "VIGIL_AMQP_HOST": self.broker.host, "VIGIL_AMQP_PORT": str(self.broker.port),
            **{f"VIGIL_AMQP_{role.upper()}_{key}": value
               for role in BrokerRole for key, value in self._login(role).items()},
            "VIGIL_AMQP_VHOST": self.broker.vhost,
            "VIGIL_AMQP_EVENT_VHOST": self.broker.event_vhost,
            "VIGIL_AMQP_MANAGEMENT_PORT": str(self.broker.management_port),
            "PYTHONPATH": str(REPO),
            **FAST_TIMINGS,
            **self.extra_env,
            **overrides,
        })
        return env

    def _login(self, role: BrokerRole) -> dict[str, str]:
        login = self.broker.login(role)
        return {"USER": login.user, "PASSWORD": login.password.get_secret_value()}

    def start(self, *args: str, name: str | None = None, module: str = "services.cli",
              **env: str) -> Proc:
        """Start `vigil ARGS...` (or another module) as a real process with this test's
        settings."""
        label = name or f"{args[0]}-{len(self.procs)}"
        log_path = self.tmp / f"{label}.log"
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(
                [sys.executable, "-m", module, *args],
                env=self.environ(**env), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, cwd=REPO,
            )
        proc = Proc(label, popen, log_path)
        self.procs.append(proc)
        return proc

    def executor(
        self, name: str = "executor", *, metrics_port: int | None = None, **env: str
    ) -> Proc:
        return self.start("executor", "--name", name, *_metrics(metrics_port), name=name,
                          **env)

    def worker(
        self, name: str, *, capacity: int = 4, runtimes: str = "shell,python",
        metrics_port: int | None = None, **env: str,
    ) -> Proc:
        return self.start("worker", "--name", name, "--capacity", str(capacity),
                          "--runtime", runtimes, *_metrics(metrics_port), name=name, **env)

    def cli(self, *args: str, input: str | None = None, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "services.cli", *args], env=self.environ(**env),
            capture_output=True, text=True, input=input, timeout=60, cwd=REPO,
        )

    async def live_workers(self, n: int, timeout: float = 30) -> list[str]:
        """Wait until n workers are ACTIVE; return their ids."""
        assert self.pool is not None
        pool = self.pool

        async def check() -> list[str] | None:
            rows = await pool.fetch("SELECT id FROM workers WHERE status = 'ACTIVE'")
            return [r["id"] for r in rows] if len(rows) >= n else None

        return await wait_until(check, timeout=timeout, what=f"{n} active workers")

    @property
    def client(self) -> AsyncClient:
        assert self.pool is not None
        return AsyncClient(self.pool, actor="test")

    async def submit(self, action: str, params: Any = None, n: int = 1, **kw: Any) -> list:
        """Submit n executions of one action in one transaction; return their ids."""
        submitted = await self.client.submit_many(
            [Submission(action, params or {}, **kw) for _ in range(n)])
        return [s.id for s in submitted]

    async def all_terminal(self, ids: list, timeout: float) -> dict[ExecutionStatus, int]:
        """Wait for every execution to end; return the count of each final state."""
        assert self.pool is not None
        pool = self.pool

        last: dict[ExecutionStatus, int] = {}

        async def check() -> dict[ExecutionStatus, int] | None:
            rows = await pool.fetch(
                "SELECT status, count(*) AS n FROM executions WHERE id = ANY($1) "
                "GROUP BY status", ids)
            last.clear()
            last.update({ExecutionStatus(r["status"]): r["n"] for r in rows})
            done = sum(n for s, n in last.items() if s in TERMINAL)
            return dict(last) if done == len(ids) else None

        return await wait_until(check, timeout=timeout, interval=0.2,
                                what=lambda: f"{len(ids)} executions to end (now {last})")


@dataclass
class DeafWorker:
    id: str
    memory_pressure: bool = False


@asynccontextmanager
async def deaf_worker(
    env: Env, actions: list[str], *, message_ttl_ms: int
) -> AsyncIterator[DeafWorker]:
    """A worker that registered, stays alive (heartbeats) and never consumes: whatever is
    sent to it dead-letters after message_ttl_ms. Set memory_pressure to stop new work
    going to it."""
    assert env.pool is not None
    pool = env.pool
    management(f"policies/{env.name}/{broker.WORKER_POLICY_NAME}", "PUT",
               broker.worker_policy(message_ttl_ms=message_ttl_ms))
    deaf = DeafWorker(f"deaf-{uuid.uuid4().hex[:8]}")
    connection = await broker.connect(env.broker, BrokerRole.WORKER, "vigil-tests deaf")
    await broker.declare_worker_queue(await connection.channel(), deaf.id)
    await workers.register(pool, workers.Registration(
        id=deaf.id, name="deaf", hostname="test", pid=0, runtimes=["python"],
        actions=actions, capacity=50))

    async def heartbeat() -> None:
        while True:
            await workers.heartbeat(pool, deaf.id, memory_bytes=95, memory_limit_bytes=100,
                                    memory_pressure=deaf.memory_pressure)
            await asyncio.sleep(0.3)

    beat = asyncio.create_task(heartbeat())
    try:
        yield deaf
    finally:
        beat.cancel()
        # Gone for good: nothing more is sent to it.
        await workers.set_status(pool, deaf.id, WorkerStatus.INACTIVE, "test_ended")
        await connection.close()


async def _connect(database: str | None = None) -> asyncpg.Connection:
    s = DatabaseSettings()
    return await asyncpg.connect(host=s.host, port=s.port, user=s.user,
                                 password=s.password.get_secret_value(),
                                 database=database or s.name)


async def local_env(tmp: Path) -> Env:
    """The local stack's own database and vhost, as `vigil` uses them by default."""
    env = Env(name="vigil", db=DatabaseSettings(), broker=BrokerSettings(), tmp=tmp)
    env.pool = await db.connect(env.db, application_name="vigil-demo")
    return env


async def create_env(tmp: Path) -> Env:
    name = f"t_{uuid.uuid4().hex[:12]}"
    base_db = DatabaseSettings()
    admin = await _connect()
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE_DB}"')
    finally:
        await admin.close()
    env = Env(
        name=name,
        db=base_db.model_copy(update={"name": name}),
        broker=BrokerSettings(vhost=name),
        tmp=tmp,
    )
    await broker_access.provision(env.broker)
    env.pool = await db.connect(env.db.model_copy(update={"pool_max_size": 5}),
                                application_name="vigil-tests")
    return env


async def destroy_env(env: Env) -> None:
    for proc in env.procs:
        proc.stop()
    if env.pool is not None:
        await env.pool.close()
    admin = await _connect()
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{env.name}" WITH (FORCE)')
    finally:
        await admin.close()
    try:
        management(f"vhosts/{env.name}", "DELETE")
    except BrokerRefused:  # 404: a test that deleted it already
        pass


async def create_template() -> None:
    """Create the migrated template database the tests clone, unless it exists."""
    from common.db.migrate import migrate

    admin = await _connect()
    try:
        await admin.execute("SELECT pg_advisory_lock($1)", _TEMPLATE_LOCK_KEY)
        if await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", TEMPLATE_DB):
            return
        # Built under another name and renamed when complete: a session killed half-way
        # leaves no half-migrated template behind.
        building = f"{TEMPLATE_DB}_building"
        await admin.execute(f'DROP DATABASE IF EXISTS "{building}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{building}"')
        conn = await _connect(building)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        await admin.execute(f'ALTER DATABASE "{building}" RENAME TO "{TEMPLATE_DB}"')
    finally:
        await admin.close()  # and with it the lock

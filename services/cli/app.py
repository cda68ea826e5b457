"""`vigil`: submit and inspect executions, run the services, set up the servers.

Exit codes: 0 success, 1 a failure (a server unavailable, a database not migrated, an
execution that did not succeed, an unexpected error), 2 a usage error (nothing was
changed). Each error is one line on stderr; --debug adds an unexpected error's traceback.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, TypeVar

import asyncpg
import typer
from rich.console import Group
from rich.live import Live
from rich.table import Table

from common import broker_access
from common.client import AsyncClient
from common.config import (
    BrokerSettings,
    DatabaseSettings,
    ExecutorSettings,
    SubmitLimits,
    WorkerSettings,
)
from common.db import executions, workers
from common.db.migrate import migrate
from common.errors import VigilError
from common.models import Execution, Worker
from common.state_machine import TERMINAL, ExecutionStatus
from common.submission import Submission
from common.submission import execution_id as execution_id_of
from services.cli import inputs, output
from services.cli.dead_letters import dead_letters_app
from services.cli.plumbing import (
    CLI_ACTOR,
    FAILURE,
    ExecutionIdArg,
    JsonOpt,
    MaxAttemptsOpt,
    ParamOpt,
    ParamsJsonOpt,
    TimeoutOpt,
    existing,
    failure,
    parse_or_exit,
    pooled,
    run_cli,
    run_command,
    set_debug,
    usage_error,
    with_pool,
)
from services.cli.schedules import schedules_app

app = typer.Typer(
    help="Vigil: a distributed task system where nothing gets stuck, lost or run twice.",
    no_args_is_help=True,
    add_completion=False,
)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
broker_app = typer.Typer(help="RabbitMQ topology.", no_args_is_help=True)
config_app = typer.Typer(help="Settings.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(broker_app, name="broker")
app.add_typer(config_app, name="config")
app.add_typer(dead_letters_app, name="dead-letters")
app.add_typer(schedules_app, name="schedules")

T = TypeVar("T")


def main() -> None:
    run_cli(typer.main.get_command(app))


@app.callback()
def _global_options(
    debug: Annotated[bool, typer.Option(
        "--debug", envvar="VIGIL_DEBUG",
        help="Show the whole traceback of an unexpected error.")] = False,
) -> None:
    set_debug(debug)


# ---- executions ------------------------------------------------------------------------


@app.command()
def submit(
    action: Annotated[str, typer.Argument(help="The action to run, e.g. shell or demo.add.")],
    param: ParamOpt = None,
    params_json: ParamsJsonOpt = None,
    max_attempts: MaxAttemptsOpt = None,
    timeout: TimeoutOpt = None,
    idempotency_key: Annotated[str | None, typer.Option(
        help="Submitting the same key again returns the existing execution.",
    )] = None,
    delay: Annotated[str | None, typer.Option(
        help="Start no sooner than this long from now: 30s, 15m, 2h, 1d.")] = None,
    at: Annotated[str | None, typer.Option(
        help="Start no sooner than this time, ISO 8601 with a zone: 2026-12-01T09:00:00Z.",
    )] = None,
    wait: Annotated[bool, typer.Option(
        "--wait", help="Follow the execution to its end; exit 0 only if it succeeded.",
    )] = False,
    wait_timeout: Annotated[float, typer.Option(help="Give up waiting after this many seconds.")]
    = 3600.0,
    as_json: JsonOpt = False,
) -> None:
    """Submit an execution of ACTION and print its id."""
    limits = SubmitLimits()
    params = parse_or_exit(inputs.parse_params, param or [], params_json, limits.max_params_bytes)
    submission = parse_or_exit(lambda: Submission(
        action, params, max_attempts=max_attempts, timeout_s=timeout,
        idempotency_key=idempotency_key,
        delay_s=None if delay is None else inputs.parse_duration(delay, "--delay"),
        at=None if at is None else inputs.parse_time(at, "--at"),
    ).checked(limits))

    async def body(pool: asyncpg.Pool) -> Execution | None:
        [submitted] = await AsyncClient(pool, limits=limits, actor=CLI_ACTOR).submit_many(
            [submission])
        if not submitted.created:
            output.warn(f"idempotency key {idempotency_key!r} already used: "
                        f"returning the existing execution {submitted.id}")
        if not await workers.offers_action(pool, action):
            output.warn(f"no live worker offers action {action!r}; "
                        "the execution waits until one does")
        if as_json and not wait:
            output.emit_json({"id": str(submitted.id), "created": submitted.created})
        elif not as_json:
            output.console.print(str(submitted.id))
        if not wait:
            return None
        return await _wait_for_end(pool, submitted.id, wait_timeout)

    final = pooled(body)()
    if final is None:
        return
    if as_json:
        output.emit_json(final)
    else:
        output.console.print(f"{final.status} after attempt {final.attempt}"
                             + (f": {final.reason}" if final.reason else ""))
    if final.status != ExecutionStatus.SUCCEEDED:
        raise typer.Exit(FAILURE)


async def _wait_for_end(pool: asyncpg.Pool, execution_id: Any, timeout_s: float) -> Execution:
    """Poll until the execution ends, showing its state on a terminal as it goes."""
    began = time.monotonic()
    delay = 0.05
    with output.progress(f"waiting for {execution_id}") as show:
        while True:
            current = await executions.get(pool, execution_id)
            assert current is not None
            if current.status in TERMINAL:
                return current
            waited = time.monotonic() - began
            if waited > timeout_s:
                raise VigilError(f"execution {execution_id} still {current.status} "
                                 f"after {timeout_s:g}s")
            show(f"{current.status}, attempt {current.attempt} of {current.max_attempts} "
                 f"({output.seconds(waited)})")
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 1.0)


@app.command("ls")
def list_executions(
    status: Annotated[ExecutionStatus | None, typer.Option(case_sensitive=False)] = None,
    action: Annotated[str | None, typer.Option()] = None,
    reason: Annotated[str | None, typer.Option(
        help="Only those that ended (or last failed) for this reason, e.g. poison.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 50,
    as_json: JsonOpt = False,
) -> None:
    """List recent executions, newest first."""

    @pooled
    async def body(pool: asyncpg.Pool) -> list[Execution]:
        return await executions.list_recent(pool, status=status, action=action,
                                            reason=reason, limit=limit)

    rows = body()
    if as_json:
        output.emit_json(rows)
        return
    output.table(None, ["id", "action", "status", "attempt", "worker", "created", "reason"], [
        (e.id, e.action, e.status, f"{e.attempt}/{e.max_attempts}", e.worker_id,
         output.when(e.created_at), e.reason) for e in rows
    ])


@app.command()
def show(
    execution_id: ExecutionIdArg,
    as_json: JsonOpt = False,
) -> None:
    """Show one execution with its whole history."""
    eid = parse_or_exit(execution_id_of, execution_id)

    @pooled
    async def body(pool: asyncpg.Pool) -> tuple[Execution, list, bool]:
        e = await existing(pool, eid)
        return e, await executions.history(pool, eid), await workers.offers_action(pool, e.action)

    e, hist, offered = body()
    if as_json:
        output.emit_json({"execution": e, "history": hist})
        return
    fields = [
        ("id", e.id), ("action", e.action), ("status", e.status),
        ("attempt", f"{e.attempt} of {e.max_attempts}"), ("dispatches", e.dispatches),
        ("worker", e.worker_id), ("reason", e.reason), ("created", output.when(e.created_at)),
        ("started", output.when(e.started_at)), ("finished", output.when(e.finished_at)),
        ("params", e.params), ("result", e.result), ("error", e.error),
    ]
    if e.status == ExecutionStatus.REQUESTED and not offered:
        fields.append(("waiting", f"for a worker offering {e.action!r}"))
    for name, value in fields:
        if value not in (None, ""):
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            output.console.print(f"{name:>10}  {text}")
    output.table("history", ["at", "attempt", "dispatch", "from", "to", "reason", "by",
                             "used", "error"], [
        (output.when(h.at), h.attempt, h.dispatch, h.from_status or "", h.to_status, h.reason,
         h.actor, output.usage(h.usage), (h.error or {}).get("message", "")) for h in hist
    ])


@app.command()
def cancel(execution_id: ExecutionIdArg, as_json: JsonOpt = False) -> None:
    """Cancel an execution in any non-terminal state; a running child is killed."""
    eid = parse_or_exit(execution_id_of, execution_id)

    @pooled
    async def body(pool: asyncpg.Pool) -> None:
        moved = await executions.cancel(pool, eid, CLI_ACTOR)
        if moved is None:
            e = await existing(pool, eid)
            raise VigilError(f"execution {eid} is already {e.status}")
        was = moved.from_status
        if as_json:
            output.emit_json({"id": eid, "cancelled": True, "was": was})
        else:
            output.console.print(f"cancelled {eid} (was {was})")

    body()


@app.command()
def retry(execution_id: ExecutionIdArg, as_json: JsonOpt = False) -> None:
    """Run a FAILED, TIMED_OUT or CANCELLED execution again, as a new attempt."""
    eid = parse_or_exit(execution_id_of, execution_id)

    @pooled
    async def body(pool: asyncpg.Pool) -> None:
        attempt = (await executions.retry(pool, [eid], CLI_ACTOR)).get(eid)
        if attempt is None:
            e = await existing(pool, eid)
            raise VigilError(f"execution {eid} is {e.status}; only FAILED, TIMED_OUT or "
                             "CANCELLED executions can be retried")
        if as_json:
            output.emit_json({"id": eid, "attempt": attempt})
        else:
            output.console.print(f"{eid} requested again as attempt {attempt}")

    body()


@app.command("workers")
def list_workers(as_json: JsonOpt = False) -> None:
    """List workers: status, heartbeat age, in-flight/capacity, runtimes."""
    stale_after_s = ExecutorSettings().stale_after_s

    @pooled
    async def body(pool: asyncpg.Pool) -> list:
        return await workers.list_all(pool, stale_after_s)

    rows = body()
    if as_json:
        output.emit_json(rows)
        return
    output.console.print(_workers_table(rows))


def _workers_table(rows: list[Worker]) -> Table:
    return output.make_table(None, ["id", "status", "heartbeat", "in flight", "runtimes",
                                    "memory", "host/pid"], [
        (w.id, f"{w.status}{' (stale)' if w.stale and w.status == 'ACTIVE' else ''}",
         f"{output.seconds(w.heartbeat_age_s)} ago", f"{w.in_flight}/{w.capacity}",
         ",".join(w.runtimes), _memory(w.memory_bytes, w.memory_limit_bytes,
                                       w.memory_pressure), f"{w.hostname}/{w.pid}")
        for w in rows
    ])


def _memory(used: int | None, limit: int | None, pressure: bool) -> str:
    if used is None:
        return ""
    text = f"{used / 2**20:.0f}MiB" + (f"/{limit / 2**20:.0f}MiB" if limit else "")
    return text + (" PRESSURE" if pressure else "")


@dataclass(frozen=True)
class _Stats:
    by_status: dict[ExecutionStatus, int]
    finished_last_minute: int
    oldest_unfinished_age_s: float | None

    def table(self) -> Table:
        oldest = self.oldest_unfinished_age_s
        return output.make_table(None, ["status", "count"], [
            *((k, v) for k, v in self.by_status.items()),
            ("finished in the last minute", self.finished_last_minute),
            ("oldest unfinished", f"{output.seconds(oldest)} old" if oldest else "none"),
        ])


async def _stats(pool: asyncpg.Pool) -> _Stats:
    return _Stats(await executions.count_by_status(pool),
                  *await executions.recent_activity(pool))


@app.command()
def stats(as_json: JsonOpt = False) -> None:
    """Counts by state, executions finished in the last minute, the oldest unfinished."""
    s = pooled(_stats)()
    if as_json:
        output.emit_json({"by_status": {str(k): v for k, v in s.by_status.items()},
                          "finished_last_minute": s.finished_last_minute,
                          "oldest_unfinished_age_s": s.oldest_unfinished_age_s})
        return
    output.console.print(s.table())


@app.command()
def top(
    interval: Annotated[float, typer.Option(min=0.2, max=60, help="Seconds between refreshes.")]
    = 1.0,
    iterations: Annotated[int | None, typer.Option(
        min=1, help="Stop after this many refreshes (default: until Ctrl-C).")] = None,
) -> None:
    """A live view of executions and workers, refreshed every second."""
    stale_after_s = ExecutorSettings().stale_after_s

    @pooled
    async def body(pool: asyncpg.Pool) -> None:
        with Live(console=output.console, auto_refresh=False) as live:
            n = 0
            while iterations is None or n < iterations:
                s = await _stats(pool)
                rows = await workers.list_all(pool, stale_after_s)
                live.update(Group(f"vigil top  {time.strftime('%H:%M:%S')}", s.table(), "",
                                  _workers_table(rows)), refresh=True)
                n += 1
                if iterations is None or n < iterations:
                    await asyncio.sleep(interval)

    try:
        body()
    except KeyboardInterrupt:
        pass


@app.command()
def prune(
    older_than: Annotated[str, typer.Option(
        help="Delete executions that finished more than this long ago: 36h, 7d, 90d.")],
    batch: Annotated[int, typer.Option(
        min=1, max=100_000, help="Executions deleted per statement (so per transaction).")]
    = 1000,
    as_json: JsonOpt = False,
) -> None:
    """Delete finished executions, with their history, that finished more than
    --older-than ago. Unfinished executions are never touched."""
    older_than_s = parse_or_exit(inputs.parse_duration, older_than, "--older-than")

    @pooled
    async def body(pool: asyncpg.Pool) -> int:
        deleted = 0
        while True:  # bounded batches, so no statement holds many locks for long
            n = await executions.prune(pool, older_than_s=older_than_s, batch=batch)
            deleted += n
            if n < batch:
                return deleted

    deleted = body()
    if as_json:
        output.emit_json({"deleted": deleted})
    else:
        output.console.print(f"deleted {deleted} execution{'s' if deleted != 1 else ''} "
                             f"finished more than {older_than} ago")


# ---- services --------------------------------------------------------------------------

ServiceNameOpt = Annotated[str | None, typer.Option(
    help="Name shown in logs and the broker UI.")]
MetricsPortOpt = Annotated[int | None, typer.Option(help="Serve /metrics and /healthz.")]


class LogLevel(StrEnum):
    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


LogLevelOpt = Annotated[LogLevel, typer.Option(case_sensitive=False)]


@app.command()
def executor(
    name: ServiceNameOpt = None,
    metrics_port: MetricsPortOpt = None,
    log_level: LogLevelOpt = LogLevel.INFO,
) -> None:
    """Run an executor: dispatch, timeout monitor, dead letters, worker events."""
    from services.executor.main import run_executor

    overrides = {"name": name, "metrics_port": metrics_port}
    settings = _settings(ExecutorSettings, overrides)
    serve("executor", run_executor, settings, log_level)


@app.command()
def worker(
    runtime: Annotated[str | None, typer.Option(
        help="Comma-separated runtimes to offer: shell, python.")] = None,
    capacity: Annotated[int | None, typer.Option(help="Attempts to run at once.")] = None,
    name: ServiceNameOpt = None,
    actions: Annotated[list[str] | None, typer.Option(
        help="Python module that registers actions (repeatable).")] = None,
    metrics_port: MetricsPortOpt = None,
    log_level: LogLevelOpt = LogLevel.INFO,
) -> None:
    """Run a worker that offers the given runtimes and actions."""
    from services.worker.main import RUNTIMES, run_worker

    overrides: dict[str, Any] = {"name": name, "capacity": capacity,
                                 "action_modules": actions, "metrics_port": metrics_port}
    if runtime is not None:
        overrides["runtimes"] = parse_or_exit(inputs.parse_runtimes, runtime, RUNTIMES)
    settings = _settings(WorkerSettings, overrides)
    serve("worker", run_worker, settings, log_level)


def serve(what: str, run: Callable[..., None], settings: Any, log_level: str) -> None:
    """Run a service until it is stopped; a failure to start (a database that is down or
    not migrated, a module that cannot be imported) is one line and exit 1."""
    try:
        check_database()
        run(settings, DatabaseSettings(), BrokerSettings(), log_level)
    except VigilError as exc:
        failure(f"{what} stopped: {exc}")


def check_database() -> None:
    """Raise unless the database answers and is migrated: the services' own start-up
    does not look at the schema, and would fail later and less clearly."""
    asyncio.run(with_pool(_checked))


async def _checked(pool: asyncpg.Pool) -> None:
    """Nothing more to do: with_pool has checked the schema."""


def _settings(cls: type[T], overrides: dict[str, Any]) -> T:
    """Settings from the environment, with the flags that were given on top."""
    from pydantic import ValidationError

    try:
        return cls(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        err = exc.errors()[0]
        usage_error(f"{'.'.join(map(str, err['loc']))}: {err['msg']}")


# ---- set-up ----------------------------------------------------------------------------


@db_app.command("migrate")
def db_migrate(as_json: JsonOpt = False) -> None:
    """Apply pending schema migrations (safe to run from several processes at once)."""

    async def body(pool: asyncpg.Pool) -> list[int]:
        async with pool.acquire() as conn:
            return await migrate(conn)

    applied = run_command(with_pool(body, check_schema=False))
    if as_json:
        output.emit_json({"applied": applied})
    else:
        output.console.print(f"applied migrations {applied}" if applied
                             else "schema up to date")


@broker_app.command("setup")
def broker_setup(as_json: JsonOpt = False) -> None:
    """Create the executor and worker users with their permissions, the worker-queue
    policy, the exchanges and the dead-letter queue (idempotent; as the administrator)."""
    settings = BrokerSettings()
    run_command(broker_access.provision(settings))
    if as_json:
        output.emit_json({"vhost": settings.vhost, "users": [
            settings.executor_user, settings.worker_user]})
        return
    output.console.print(
        f"broker ready on vhost {settings.vhost!r}: users {settings.executor_user!r} and "
        f"{settings.worker_user!r}, worker-queue policy, exchanges and dead-letter queue")


@config_app.command("docs")
def config_docs() -> None:
    """Print every setting as Markdown (the source of docs/configuration.md)."""
    from services.cli.docs import render

    typer.echo(render(), nl=False)

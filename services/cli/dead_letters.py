"""`vigil dead-letters`: dispatches that worker queues gave back, and what became of them.

A dispatch is dead-lettered when it waits in a worker's queue past the message TTL, or
the worker rejects it. An executor consumes `vigil.dead-letters` at once and records
each in the execution's history (reason `dead_letter_<cause>`): dispatched again, or
FAILED (reason `max_dispatches`) once the attempt was delivered that many times. So the
history is where dead letters are listed and inspected; the queue holds only those no
executor has handled yet. `requeue` runs those FAILED executions again.
"""

from __future__ import annotations

import uuid
from typing import Annotated

import asyncpg
import typer

from common import broker
from common.config import BrokerSettings
from common.db import executions
from common.errors import Unavailable, VigilError
from common.models import DeadLetter, Execution
from common.state_machine import ErrorKind, ExecutionStatus, Reason
from common.submission import execution_id as execution_id_of
from services.cli import inputs, output
from services.cli.plumbing import (
    CLI_ACTOR,
    ExecutionIdArg,
    JsonOpt,
    existing,
    parse_or_exit,
    pooled,
    usage_error,
)

dead_letters_app = typer.Typer(
    help="Dispatches worker queues gave back: list, inspect, requeue.", no_args_is_help=True)

SinceOpt = Annotated[str | None, typer.Option(
    help="Only the last this long: 90s, 15m, 24h, 7d [default: 24h].")]


def _since_s(since: str | None) -> float:
    return parse_or_exit(inputs.parse_duration, since or "24h", "--since")


async def _waiting() -> int | None:
    """Dead letters no executor has handled yet, or None (with a warning) if the broker
    can't say: the history is still worth showing."""
    try:
        return await broker.dead_letters_waiting(BrokerSettings())
    except Unavailable as exc:
        output.warn(f"{exc}; dead letters waiting in the queue not counted")
        return None


def _table(rows: list[DeadLetter]) -> None:
    output.table(None, ["at", "execution", "action", "attempt.dispatch", "worker", "cause",
                        "then", "now"], [
        (output.when(d.at), d.execution_id, d.action, f"{d.attempt}.{d.dispatch}",
         d.worker_id, d.cause,
         "dispatched again" if d.outcome == ExecutionStatus.REQUESTED else str(d.outcome),
         d.status_now) for d in rows
    ])


def _requeueable(e: Execution) -> bool:
    return e.status == ExecutionStatus.FAILED and e.reason == ErrorKind.MAX_DISPATCHES


@dead_letters_app.command("list")
def list_dead_letters(
    since: SinceOpt = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 50,
    as_json: JsonOpt = False,
) -> None:
    """Recent dead letters, newest first, and how many wait for an executor."""
    since_s = _since_s(since)

    @pooled
    async def body(pool: asyncpg.Pool) -> tuple[list[DeadLetter], int | None]:
        return await executions.dead_letters(pool, since_s=since_s, limit=limit), \
            await _waiting()

    rows, waiting = body()
    if as_json:
        output.emit_json({"waiting": waiting, "dead_letters": rows})
        return
    if waiting:
        output.console.print(f"{waiting} dead letters wait in {broker.DEAD_LETTER_QUEUE} "
                             "for an executor to handle them")
    if not rows:
        output.console.print(f"no dead letters in the last {since or '24h'}")
        return
    _table(rows)


@dead_letters_app.command("inspect")
def inspect(
    execution_id: ExecutionIdArg,
    as_json: JsonOpt = False,
) -> None:
    """Every dead letter of one execution, and whether it can be requeued."""
    eid = parse_or_exit(execution_id_of, execution_id)

    @pooled
    async def body(pool: asyncpg.Pool) -> tuple[Execution, list[DeadLetter]]:
        e = await existing(pool, eid)
        return e, await executions.dead_letters(pool, since_s=None, execution_id=eid,
                                                limit=10_000)

    e, rows = body()
    if as_json:
        output.emit_json({"execution": e, "dead_letters": rows, "requeueable": _requeueable(e)})
        return
    output.console.print(f"{e.id} ({e.action}) is {e.status}"
                         + (f" ({e.reason})" if e.reason else "")
                         + f", attempt {e.attempt} of {e.max_attempts}")
    if not rows:
        output.console.print("it has no dead letters")
        return
    _table(rows)
    if _requeueable(e):
        output.console.print(f"run it again with: vigil dead-letters requeue {e.id}")


@dead_letters_app.command("requeue")
def requeue(
    execution_ids: Annotated[list[str] | None, typer.Argument(
        help="Executions to requeue (or --all).", show_default=False)] = None,
    all_: Annotated[bool, typer.Option(
        "--all", help="Every execution FAILED by dead letters within --since.")] = False,
    since: SinceOpt = None,
    action: Annotated[str | None, typer.Option(help="With --all: only this action.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100_000, help="With --all: at most this "
                                                               "many.")] = 1000,
    as_json: JsonOpt = False,
) -> None:
    """Run executions that FAILED because their dispatches were dead-lettered
    (max_dispatches) again, each as a new attempt."""
    if bool(execution_ids) == all_:
        usage_error("give the executions to requeue, or --all (not both)")
    if execution_ids and (since or action):
        usage_error("--since and --action go with --all")
    since_s = _since_s(since)
    ids = [parse_or_exit(execution_id_of, x) for x in execution_ids or []]

    @pooled
    async def body(pool: asyncpg.Pool) -> dict[uuid.UUID, int]:
        if all_:
            chosen = await executions.failed_dead_lettered(
                pool, since_s=since_s, action=action, limit=limit)
        else:
            # Check them all first, so that one wrong id changes nothing.
            for eid in ids:
                e = await existing(pool, eid)
                if not _requeueable(e):
                    raise VigilError(
                        f"execution {eid} is {e.status}" + (f" ({e.reason})" if e.reason else "")
                        + f", not FAILED by dead letters ({ErrorKind.MAX_DISPATCHES}); "
                          "`vigil retry` runs any finished execution again")
            chosen = ids
        return await executions.retry(pool, chosen, CLI_ACTOR, reason=Reason.DEAD_LETTER_REQUEUED,
                                      only_failed_for=ErrorKind.MAX_DISPATCHES)

    moved = body()
    if as_json:
        output.emit_json([{"id": eid, "attempt": attempt} for eid, attempt in moved.items()])
        return
    output.console.print(f"requeued {len(moved)} execution{'s' if len(moved) != 1 else ''}")
    for eid, attempt in moved.items():
        output.console.print(f"{eid} requested again as attempt {attempt}")

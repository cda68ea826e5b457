"""Queries on executions and their history (SQL in sql/executions.sql).

Every function that moves executions returns what it moved as `Moved` rows (from, to,
reason, n), which callers hand to common.metrics.count_moves.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from common.db.queries import Conn, load
from common.models import DeadLetter, Dispatch, Execution, HistoryEntry
from common.state_machine import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_TIMEOUT_S,
    KILLED,
    NOT_COUNTED,
    AttemptError,
    ErrorKind,
    ExecutionStatus,
    Moved,
    Reason,
)
from common.submission import Submission

SQL = load("executions")


@dataclass(frozen=True)
class Submitted:
    id: uuid.UUID
    created: bool


@dataclass(frozen=True)
class Started:
    id: uuid.UUID
    action: str
    params: Any
    attempt: int
    dispatch: int
    timeout_s: int
    checkpoint: Any
    checkpoint_attempt: int | None


@dataclass(frozen=True)
class Ended:
    """How one attempt ended on its worker."""

    id: uuid.UUID
    attempt: int
    dispatch: int
    outcome: ExecutionStatus  # SUCCEEDED or FAILED
    result: Any = None
    error: AttemptError | None = None
    retry_delay_s: float | None = None  # the backoff, if it is retried
    usage: dict[str, float] | None = None  # peak_rss_bytes, cpu_s, wall_s

    @property
    def reason(self) -> str:
        return Reason.SUCCEEDED if self.error is None else self.error.kind

    @property
    def retryable(self) -> bool:
        return self.error is not None and self.error.retryable

    @property
    def killed(self) -> bool:
        return self.error is not None and self.error.kind in KILLED


def _moves(rows: list[asyncpg.Record]) -> list[Moved]:
    return [Moved(ExecutionStatus(r["from_status"]) if r["from_status"] else None,
                  ExecutionStatus(r["to_status"]), r["reason"], r["n"]) for r in rows]


# ---- submitting and reading -------------------------------------------------------------

async def insert(conn: Conn, submissions: Sequence[Submission], actor: str) -> list[Submitted]:
    """Create REQUESTED executions in one statement, in order; a submission whose
    idempotency key is taken gets that execution instead (created False)."""
    rows = await SQL["insert"].fetch(
        conn,
        actions=[s.action for s in submissions], params=[s.params for s in submissions],
        max_attempts=[s.max_attempts for s in submissions],
        timeouts_s=[s.timeout_s for s in submissions],
        keys=[s.idempotency_key for s in submissions],
        delays_s=[s.delay_s for s in submissions], at=[s.at for s in submissions],
        default_max_attempts=DEFAULT_MAX_ATTEMPTS, default_timeout_s=DEFAULT_TIMEOUT_S,
        reason=Reason.SUBMITTED, actor=actor,
    )
    racing = [r["key"] for r in rows if r["id"] is None]
    # A key another submission committed while this statement ran: visible now.
    found = {r["key"]: r["id"] for r in await SQL["by_keys"].fetch(conn, keys=racing)} \
        if racing else {}
    return [Submitted(r["id"] or found[r["key"]], r["created"]) for r in rows]


async def get(conn: Conn, execution_id: uuid.UUID) -> Execution | None:
    row = await SQL["get"].fetchrow(conn, id=execution_id)
    return Execution.model_validate(dict(row)) if row else None


async def history(conn: Conn, execution_id: uuid.UUID) -> list[HistoryEntry]:
    rows = await SQL["history"].fetch(conn, id=execution_id)
    return [HistoryEntry.model_validate(dict(r)) for r in rows]


async def list_recent(
    conn: Conn, *, status: ExecutionStatus | None, action: str | None, limit: int,
    reason: str | None = None,
) -> list[Execution]:
    rows = await SQL["list"].fetch(conn, status=status, action=action, reason=reason,
                                   limit=limit)
    return [Execution.model_validate(dict(r)) for r in rows]


async def count_by_status(conn: Conn) -> dict[ExecutionStatus, int]:
    return {ExecutionStatus(r["status"]): r["n"]
            for r in await SQL["count_by_status"].fetch(conn)}


# ---- dispatch ---------------------------------------------------------------------------

async def dispatch(
    conn: Conn, *, round_id: uuid.UUID, batch: int, stale_after_s: float, actor: str
) -> list[Dispatch]:
    """One dispatch round (claim, assign, mark SCHEDULED) in one statement: what it
    scheduled, committed, to publish."""
    rows = await SQL["dispatch"].fetch(conn, round_id=round_id, batch=batch,
                                       stale_after_s=stale_after_s, reason=Reason.DISPATCHED,
                                       actor=actor)
    return [Dispatch(**dict(r)) for r in rows]


async def next_due_in(conn: Conn) -> float | None:
    """Seconds until the next not-yet-due REQUESTED execution some worker offers is due."""
    return await SQL["next_due"].fetchval(conn)


def _tokens(dispatches: Sequence[Dispatch]) -> dict[str, list[Any]]:
    return {"ids": [d.id for d in dispatches], "attempts": [d.attempt for d in dispatches],
            "dispatches": [d.dispatch for d in dispatches],
            "worker_ids": [d.worker_id for d in dispatches]}


async def committed_dispatches(conn: Conn, round_id: uuid.UUID) -> list[Dispatch]:
    """What this dispatch round scheduled that is still SCHEDULED."""
    rows = await SQL["committed_dispatches"].fetch(conn, round_id=round_id)
    return [Dispatch(**dict(r)) for r in rows]


async def release_dispatches(
    conn: Conn, dispatches: Sequence[Dispatch], *, reason: Reason, actor: str,
    max_dispatches: int | None = None,
) -> list[Moved]:
    """Put never-started dispatches back to REQUESTED (or FAILED past max_dispatches,
    needed unless the reason is one that does not count); those whose token no longer
    matches are left alone (not in the result)."""
    counted = reason not in NOT_COUNTED
    if counted and max_dispatches is None:
        raise ValueError(f"releasing for {reason} counts against max_dispatches: give it")
    rows = await SQL["release_dispatches"].fetch(
        conn, **_tokens(dispatches), counted=counted, max_dispatches=max_dispatches,
        exhausted=ErrorKind.MAX_DISPATCHES, reason=reason, actor=actor,
    )
    return _moves(rows)


# ---- the worker's side ------------------------------------------------------------------

@dataclass(frozen=True)
class Synced:
    """What one sync moved: the attempts that started, and how the ended ones moved;
    a token no longer this worker's is missing from either."""

    started: dict[uuid.UUID, Started]
    ended: dict[uuid.UUID, Moved]


async def sync(
    conn: Conn, worker_id: str, *, starts: Sequence[Dispatch] = (),
    ends: Sequence[Ended] = (),
) -> Synced:
    """A worker's writes of one moment in one statement: record how attempts ended and
    start (SCHEDULED -> RUNNING) the dispatches it received."""
    rows = await SQL["sync"].fetch(
        conn, worker_id=worker_id,
        end_ids=[e.id for e in ends], end_attempts=[e.attempt for e in ends],
        end_dispatches=[e.dispatch for e in ends], outcomes=[e.outcome for e in ends],
        reasons=[e.reason for e in ends], retryable=[e.retryable for e in ends],
        killed=[e.killed for e in ends], retry_delays_s=[e.retry_delay_s for e in ends],
        results=[e.result for e in ends],
        errors=[e.error.as_json() if e.error else None for e in ends],
        usages=[e.usage for e in ends],
        start_ids=[d.id for d in starts], start_attempts=[d.attempt for d in starts],
        start_dispatches=[d.dispatch for d in starts], started_reason=Reason.STARTED,
    )
    started, ended = {}, {}
    for r in rows:
        if r["started"]:
            started[r["id"]] = Started(
                r["id"], r["action"], r["params"], r["attempt"], r["dispatch"], r["timeout_s"],
                r["checkpoint"], r["checkpoint_attempt"])
        else:
            ended[r["id"]] = Moved(ExecutionStatus.RUNNING, ExecutionStatus(r["to_status"]),
                                   r["reason"])
    return Synced(started, ended)


async def running_not_owned(
    conn: Conn, worker_id: str, attempts: dict[uuid.UUID, int]
) -> set[uuid.UUID]:
    if not attempts:
        return set()
    rows = await SQL["running_not_owned"].fetch(
        conn, ids=list(attempts), attempts=list(attempts.values()), worker_id=worker_id)
    return {r["id"] for r in rows}


async def running_unknown(
    conn: Conn, worker_id: str, known: list[uuid.UUID], grace_s: float
) -> list[Dispatch]:
    """Attempts RUNNING on this worker by the database's books that it doesn't know,
    started more than grace_s ago."""
    rows = await SQL["running_unknown"].fetch(conn, worker_id=worker_id, known=known,
                                              grace_s=grace_s)
    return [Dispatch(worker_id=worker_id, **dict(r)) for r in rows]


async def save_checkpoint(
    conn: Conn, *, execution_id: uuid.UUID, attempt: int, worker_id: str, checkpoint: Any
) -> bool:
    return await SQL["save_checkpoint"].fetchval(
        conn, id=execution_id, attempt=attempt, worker_id=worker_id, checkpoint=checkpoint,
    ) is not None


# ---- the timeout monitor ----------------------------------------------------------------

async def release_stuck_scheduled(
    conn: Conn, *, schedule_to_start_s: float, stale_after_s: float, max_dispatches: int,
    batch: int, actor: str,
) -> list[Moved]:
    return _moves(await SQL["release_stuck_scheduled"].fetch(
        conn, schedule_to_start_s=schedule_to_start_s, stale_after_s=stale_after_s,
        max_dispatches=max_dispatches, exhausted=ErrorKind.SCHEDULE_TIMEOUT, batch=batch,
        actor=actor))


async def end_abandoned_attempts(
    conn: Conn, *, stale_after_s: float, retry_delay_s: float, batch: int, actor: str
) -> list[Moved]:
    """End the attempts of workers that are gone, and those past their timeout."""
    return _moves(await SQL["end_abandoned_attempts"].fetch(
        conn, stale_after_s=stale_after_s, retry_delay_s=retry_delay_s, batch=batch,
        lost_kind=ErrorKind.WORKER_LOST, timeout_kind=ErrorKind.TIMEOUT,
        timeout_reason=Reason.START_TO_CLOSE_TIMEOUT, actor=actor))


async def fail_unassignable(
    conn: Conn, *, queue_timeout_s: float, batch: int, actor: str
) -> list[Moved]:
    return _moves(await SQL["fail_unassignable"].fetch(
        conn, queue_timeout_s=queue_timeout_s, batch=batch, reason=Reason.NO_WORKER,
        kind=ErrorKind.NO_WORKER, actor=actor))


# ---- operators --------------------------------------------------------------------------

async def cancel(conn: Conn, execution_id: uuid.UUID, actor: str) -> Moved | None:
    """Cancel a non-terminal execution; None if it had already finished (or is unknown)."""
    from_status = await SQL["cancel"].fetchval(
        conn, id=execution_id, reason=Reason.CANCELLED, kind=ErrorKind.CANCELLED, actor=actor)
    if from_status is None:
        return None
    return Moved(ExecutionStatus(from_status), ExecutionStatus.CANCELLED, Reason.CANCELLED)


async def retry(
    conn: Conn, ids: list[uuid.UUID], actor: str, *, reason: Reason = Reason.RETRY_REQUESTED,
    only_failed_for: str | None = None,
) -> dict[uuid.UUID, int]:
    """Re-run FAILED, TIMED_OUT or CANCELLED executions (only those FAILED for
    `only_failed_for`, if given); return the new attempt of each one that moved."""
    rows = await SQL["retry"].fetch(conn, ids=ids, actor=actor, reason=reason,
                                    only_reason=only_failed_for)
    return {r["id"]: r["attempt"] for r in rows}


async def prune(conn: Conn, *, older_than_s: float, batch: int) -> int:
    """Delete up to `batch` executions finished more than older_than_s ago, with their
    history; return how many."""
    return await SQL["prune"].fetchval(conn, older_than_s=older_than_s, batch=batch)


async def dead_letters(
    conn: Conn, *, since_s: float | None, execution_id: uuid.UUID | None = None,
    limit: int,
) -> list[DeadLetter]:
    rows = await SQL["dead_letters"].fetch(conn, since_s=since_s, execution_id=execution_id,
                                           limit=limit)
    return [DeadLetter(**dict(r)) for r in rows]


async def failed_dead_lettered(
    conn: Conn, *, since_s: float, action: str | None, limit: int
) -> list[uuid.UUID]:
    """Executions FAILED (since_s ago at most) because their last delivery was
    dead-lettered, newest first."""
    rows = await SQL["failed_dead_lettered"].fetch(
        conn, since_s=since_s, action=action, limit=limit, reason=ErrorKind.MAX_DISPATCHES)
    return [r["id"] for r in rows]


@dataclass(frozen=True)
class InFlight:
    status: ExecutionStatus
    action: str
    count: int
    oldest_s: float


async def non_terminal_by_action(conn: Conn) -> list[InFlight]:
    return [InFlight(ExecutionStatus(r["status"]), r["action"], r["n"], r["oldest_s"])
            for r in await SQL["non_terminal_by_action"].fetch(conn)]


async def recent_activity(conn: Conn) -> tuple[int, float | None]:
    """(executions finished in the last minute, age in s of the oldest unfinished)."""
    row = await SQL["recent_activity"].fetchrow(conn)
    assert row is not None
    return row["finished_last_minute"], row["oldest_non_terminal_s"]

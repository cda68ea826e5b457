"""Queries on executions and their history (SQL in sql/executions.sql)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg

from common.db.queries import Conn, load
from common.models import DeadLetter, Execution, ExecutionStatus, HistoryEntry

SQL = load("executions")


@dataclass(frozen=True)
class Submitted:
    id: uuid.UUID
    created: bool


@dataclass(frozen=True)
class Claimed:
    id: uuid.UUID
    action: str
    attempt: int
    previous_worker_id: str | None


@dataclass(frozen=True)
class Scheduled:
    id: uuid.UUID
    attempt: int
    dispatch: int
    worker_id: str


@dataclass(frozen=True)
class Started:
    id: uuid.UUID
    action: str
    params: Any
    attempt: int
    timeout_s: int
    checkpoint: Any


async def insert(
    conn: Conn,
    *,
    action: str,
    params: Any,
    max_attempts: int | None,
    timeout_s: int | None,
    idempotency_key: str | None,
    actor: str,
) -> Submitted:
    """Insert a REQUESTED execution (unset limits take the action's defaults); with an
    idempotency key already used, return that execution instead."""
    row = await conn.fetchrow(
        SQL["insert"], action, params, max_attempts, timeout_s, idempotency_key, actor
    )
    assert row is not None
    return Submitted(id=row["id"], created=row["created"])


async def get(conn: Conn, execution_id: uuid.UUID) -> Execution | None:
    row = await conn.fetchrow(SQL["get"], execution_id)
    return Execution.model_validate(dict(row)) if row else None


async def history(conn: Conn, execution_id: uuid.UUID) -> list[HistoryEntry]:
    rows = await conn.fetch(SQL["history"], execution_id)
    return [HistoryEntry.model_validate(dict(r)) for r in rows]


async def list_recent(
    conn: Conn, *, status: ExecutionStatus | None, action: str | None, limit: int
) -> list[Execution]:
    rows = await conn.fetch(SQL["list"], status, action, limit)
    return [Execution.model_validate(dict(r)) for r in rows]


async def count_by_status(conn: Conn) -> dict[ExecutionStatus, int]:
    return {ExecutionStatus(r["status"]): r["n"] for r in await conn.fetch(SQL["count_by_status"])}


async def claim_due(conn: asyncpg.Connection, wanted: dict[str, int]) -> list[Claimed]:
    """Lock due REQUESTED executions, at most wanted[action] of each action."""
    if not wanted:
        return []
    rows = await conn.fetch(SQL["claim_due"], list(wanted), list(wanted.values()))
    return [Claimed(**dict(r)) for r in rows]


def _scheduled(rows: list[asyncpg.Record]) -> list[Scheduled]:
    return [Scheduled(id=r["id"], attempt=r["attempt"], dispatch=r["dispatches"],
                      worker_id=r["worker_id"]) for r in rows]


async def mark_scheduled(
    conn: asyncpg.Connection, assignments: list[tuple[Claimed, str]], actor: str
) -> list[Scheduled]:
    rows = await conn.fetch(
        SQL["mark_scheduled"],
        [c.id for c, _ in assignments],
        [c.attempt for c, _ in assignments],
        [w for _, w in assignments],
        actor,
    )
    return _scheduled(rows)


async def committed_dispatches(conn: Conn, dispatches: list[Scheduled]) -> list[Scheduled]:
    """Those of these dispatches that are SCHEDULED with exactly this token."""
    rows = await conn.fetch(
        SQL["committed_dispatches"], [d.id for d in dispatches],
        [d.attempt for d in dispatches], [d.dispatch for d in dispatches],
        [d.worker_id for d in dispatches],
    )
    return _scheduled(rows)


async def release_scheduled(
    conn: Conn,
    *,
    execution_id: uuid.UUID,
    attempt: int,
    dispatch: int,
    worker_id: str,
    reason: str,
    actor: str,
    max_dispatches: int,
    publish_failed: bool = False,
) -> ExecutionStatus | None:
    """Put a never-started dispatch back to REQUESTED (or FAILED past max_dispatches).

    Returns the new status, or None when the token no longer matches.
    """
    row = await conn.fetchrow(
        SQL["release_scheduled"],
        execution_id, attempt, dispatch, worker_id, reason, actor, max_dispatches,
        publish_failed,
    )
    return ExecutionStatus(row["status"]) if row else None


async def start(
    conn: Conn, *, execution_id: uuid.UUID, attempt: int, dispatch: int, worker_id: str
) -> Started | None:
    row = await conn.fetchrow(SQL["start"], execution_id, attempt, dispatch, worker_id)
    return Started(**dict(row)) if row else None


async def finish(
    conn: Conn,
    *,
    execution_id: uuid.UUID,
    attempt: int,
    dispatch: int,
    worker_id: str,
    status: ExecutionStatus,
    retry_delay_s: float | None,
    result: Any,
    error: Any,
    reason: str,
) -> ExecutionStatus | None:
    """Record an attempt's outcome; None when the attempt is no longer this worker's."""
    row = await conn.fetchrow(
        SQL["finish"],
        execution_id, attempt, worker_id, status, retry_delay_s, result, error, reason, dispatch,
    )
    return ExecutionStatus(row["status"]) if row else None


async def running_not_owned(
    conn: Conn, worker_id: str, attempts: dict[uuid.UUID, int]
) -> set[uuid.UUID]:
    if not attempts:
        return set()
    rows = await conn.fetch(
        SQL["running_not_owned"], list(attempts), list(attempts.values()), worker_id
    )
    return {r["id"] for r in rows}


async def running_unknown(
    conn: Conn, worker_id: str, known: list[uuid.UUID]
) -> list[tuple[uuid.UUID, int, int]]:
    """(id, attempt, dispatch) of attempts RUNNING on this worker that it doesn't know."""
    rows = await conn.fetch(SQL["running_unknown"], worker_id, known)
    return [(r["id"], r["attempt"], r["dispatch"]) for r in rows]


async def save_checkpoint(
    conn: Conn, *, execution_id: uuid.UUID, attempt: int, worker_id: str, checkpoint: Any
) -> bool:
    return await conn.fetchval(
        SQL["save_checkpoint"], execution_id, attempt, worker_id, checkpoint
    ) is not None


async def release_stuck_scheduled(
    conn: Conn, *, schedule_to_start_s: float, stale_after_s: float, max_dispatches: int,
    batch: int, actor: str,
) -> list[tuple[ExecutionStatus, str, int]]:
    rows = await conn.fetch(SQL["release_stuck_scheduled"], schedule_to_start_s,
                            stale_after_s, max_dispatches, batch, actor)
    return [(ExecutionStatus(r["status"]), r["why"], r["n"]) for r in rows]


async def recover_lost_running(
    conn: Conn, *, stale_after_s: float, retry_delay_s: float, batch: int, actor: str
) -> list[tuple[ExecutionStatus, str, int]]:
    rows = await conn.fetch(SQL["recover_lost_running"], stale_after_s, retry_delay_s,
                            batch, actor)
    return [(ExecutionStatus(r["status"]), r["why"], r["n"]) for r in rows]


async def time_out_running(conn: Conn, *, batch: int, actor: str) -> int:
    return await conn.fetchval(SQL["time_out_running"], batch, actor)


async def fail_unassignable(conn: Conn, *, queue_timeout_s: float, batch: int, actor: str) -> int:
    return await conn.fetchval(SQL["fail_unassignable"], queue_timeout_s, batch, actor)


async def cancel(conn: Conn, execution_id: uuid.UUID, actor: str) -> ExecutionStatus | None:
    """Cancel a non-terminal execution; return the state it was in, or None."""
    from_status = await conn.fetchval(SQL["cancel"], execution_id, actor)
    return ExecutionStatus(from_status) if from_status else None


# Why an execution FAILED when its last delivery was dead-lettered (release_scheduled).
DEAD_LETTERED = "max_dispatches"


async def retry(
    conn: Conn, ids: list[uuid.UUID], actor: str, *, reason: str = "retry_requested",
    only_failed_for: str | None = None,
) -> dict[uuid.UUID, int]:
    """Re-run FAILED, TIMED_OUT or CANCELLED executions (only those FAILED for
    `only_failed_for`, if given); return the new attempt of each one that moved."""
    rows = await conn.fetch(SQL["retry"], ids, actor, reason, only_failed_for)
    return {r["id"]: r["attempt"] for r in rows}


async def dead_letters(
    conn: Conn, *, since_s: float | None, execution_id: uuid.UUID | None = None,
    limit: int,
) -> list[DeadLetter]:
    rows = await conn.fetch(SQL["dead_letters"], since_s, execution_id, limit)
    return [DeadLetter(**dict(r)) for r in rows]


async def failed_dead_lettered(
    conn: Conn, *, since_s: float, action: str | None, limit: int
) -> list[uuid.UUID]:
    """Executions FAILED (since_s ago at most) because their last delivery was
    dead-lettered, newest first."""
    rows = await conn.fetch(SQL["failed_dead_lettered"], since_s, action, limit)
    return [r["id"] for r in rows]


@dataclass(frozen=True)
class InFlight:
    status: ExecutionStatus
    action: str
    count: int
    oldest_s: float


async def non_terminal_by_action(conn: Conn) -> list[InFlight]:
    return [InFlight(ExecutionStatus(r["status"]), r["action"], r["n"], r["oldest_s"])
            for r in await conn.fetch(SQL["non_terminal_by_action"])]


async def recent_activity(conn: Conn) -> tuple[int, float | None]:
    """(executions finished in the last minute, age in s of the oldest unfinished)."""
    row = await conn.fetchrow(SQL["recent_activity"])
    assert row is not None
    return row["finished_last_minute"], row["oldest_non_terminal_s"]

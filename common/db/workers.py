"""Queries on workers (SQL in sql/workers.sql)."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from common.db.queries import Conn, load
from common.models import Worker, WorkerStatus

SQL = load("workers")


@dataclass(frozen=True)
class Registration:
    id: str
    name: str
    hostname: str
    pid: int
    runtimes: list[str]
    actions: list[str]
    capacity: int


@dataclass(frozen=True)
class Eligible:
    id: str
    actions: frozenset[str]
    free_slots: int


async def register(conn: Conn, r: Registration) -> None:
    await conn.execute(
        SQL["register"], r.id, r.name, r.hostname, r.pid, r.runtimes, r.actions, r.capacity
    )


async def heartbeat(
    conn: Conn,
    worker_id: str,
    *,
    memory_bytes: int | None,
    memory_limit_bytes: int | None,
    memory_pressure: bool,
) -> WorkerStatus | None:
    status = await conn.fetchval(
        SQL["heartbeat"], worker_id, memory_bytes, memory_limit_bytes, memory_pressure
    )
    return WorkerStatus(status) if status else None


async def set_status(conn: Conn, worker_id: str, status: WorkerStatus, reason: str) -> None:
    await conn.execute(SQL["set_status"], worker_id, status, reason)


async def lock_eligible(conn: asyncpg.Connection, stale_after_s: float) -> list[Eligible]:
    """Within a transaction: lock the ACTIVE workers, then count their free slots."""
    await conn.execute(SQL["lock_active"])
    rows = await conn.fetch(SQL["eligible"], stale_after_s)
    return [
        Eligible(id=r["id"], actions=frozenset(r["actions"]), free_slots=r["free_slots"])
        for r in rows
    ]


async def offers_action(conn: Conn, action: str) -> bool:
    return bool(await conn.fetchval(SQL["offers_action"], action))


async def list_all(conn: Conn, stale_after_s: float) -> list[Worker]:
    return [Worker.model_validate(dict(r)) for r in await conn.fetch(SQL["list"], stale_after_s)]


async def mark_lost(conn: Conn, worker_id: str, reason: str) -> bool:
    return await conn.fetchval(SQL["mark_lost"], worker_id, reason) is not None


async def mark_stale_lost(conn: Conn, stale_after_s: float) -> list[str]:
    return [r["id"] for r in await conn.fetch(SQL["mark_stale_lost"], stale_after_s)]


async def count_by_status(conn: Conn) -> dict[WorkerStatus, int]:
    return {WorkerStatus(r["status"]): r["n"] for r in await conn.fetch(SQL["count_by_status"])}

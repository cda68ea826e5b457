"""Queries on workers (SQL in sql/workers.sql)."""

from __future__ import annotations

from dataclasses import dataclass

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
    prefetch: int = 0


async def register(conn: Conn, r: Registration) -> None:
    await SQL["register"].execute(
        conn, id=r.id, name=r.name, hostname=r.hostname, pid=r.pid, runtimes=r.runtimes,
        actions=r.actions, capacity=r.capacity, prefetch=r.prefetch,
    )


async def heartbeat(
    conn: Conn,
    worker_id: str,
    *,
    memory_bytes: int | None,
    memory_limit_bytes: int | None,
    memory_pressure: bool,
) -> WorkerStatus | None:
    status = await SQL["heartbeat"].fetchval(
        conn, id=worker_id, memory_bytes=memory_bytes, memory_limit_bytes=memory_limit_bytes,
        memory_pressure=memory_pressure,
    )
    return WorkerStatus(status) if status else None


async def set_status(conn: Conn, worker_id: str, status: WorkerStatus, reason: str) -> None:
    await SQL["set_status"].execute(conn, id=worker_id, status=status, reason=reason)


async def offers_action(conn: Conn, action: str) -> bool:
    return bool(await SQL["offers_action"].fetchval(conn, action=action))


async def list_all(conn: Conn, stale_after_s: float) -> list[Worker]:
    rows = await SQL["list"].fetch(conn, stale_after_s=stale_after_s)
    return [Worker.model_validate(dict(r)) for r in rows]


async def mark_lost(conn: Conn, worker_id: str, reason: str) -> bool:
    return await SQL["mark_lost"].fetchval(conn, id=worker_id, reason=reason) is not None


async def mark_stale_lost(conn: Conn, stale_after_s: float) -> list[str]:
    return [r["id"] for r in await SQL["mark_stale_lost"].fetch(conn, stale_after_s=stale_after_s)]


async def count_by_status(conn: Conn) -> dict[WorkerStatus, int]:
    return {WorkerStatus(r["status"]): r["n"] for r in await SQL["count_by_status"].fetch(conn)}

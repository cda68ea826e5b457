"""Queries on schedules (SQL in sql/schedules.sql)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import asyncpg

from common.db.queries import Conn, load
from common.models import Overlap, Schedule

SQL = load("schedules")


async def insert(
    conn: Conn, *, name: str, action: str, params: Any, every_s: int | None,
    cron: str | None, overlap: Overlap, first_fire_at: datetime, max_attempts: int | None,
    timeout_s: int | None,
) -> bool:
    """Create a schedule; False if one of that name exists."""
    return await SQL["insert"].fetchval(
        conn, name=name, action=action, params=params, every_s=every_s, cron=cron,
        overlap=overlap, first_fire_at=first_fire_at, max_attempts=max_attempts,
        timeout_s=timeout_s,
    ) is not None


async def list_all(conn: Conn, name: str | None = None) -> list[Schedule]:
    return [Schedule(**dict(r)) for r in await SQL["list"].fetch(conn, name=name)]


async def delete(conn: Conn, name: str) -> bool:
    return await SQL["delete"].fetchval(conn, name=name) is not None


async def set_paused(
    conn: Conn, name: str, paused: bool, next_fire_at: datetime | None = None
) -> bool:
    return await SQL["set_paused"].fetchval(
        conn, name=name, paused=paused, next_fire_at=next_fire_at) is not None


async def claim_due(
    conn: asyncpg.Connection, limit: int
) -> list[tuple[Schedule, datetime]]:
    """The due schedules, locked until the transaction ends, each with the database's
    now() to compute its next fire time from."""
    rows = await SQL["claim_due"].fetch(conn, limit=limit)
    return [(Schedule(**{k: v for k, v in r.items() if k != "db_now"}), r["db_now"])
            for r in rows]


async def advance(
    conn: asyncpg.Connection, name: str, *, next_fire_at: datetime, fired_at: datetime,
    execution_id: uuid.UUID | None,
) -> None:
    """Set the next fire time after a firing (execution_id) or a skip (None)."""
    await SQL["advance"].execute(conn, name=name, next_fire_at=next_fire_at,
                                 execution_id=execution_id, fired_at=fired_at)


async def skipped(conn: Conn) -> dict[str, int]:
    """Ticks each schedule skipped in a row (its previous firing still going)."""
    return {r["name"]: r["skipped"] for r in await SQL["skipped"].fetch(conn)}

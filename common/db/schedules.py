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
    return await conn.fetchval(
        SQL["insert"], name, action, params, every_s, cron, overlap, first_fire_at,
        max_attempts, timeout_s,
    ) is not None


async def list_all(conn: Conn, name: str | None = None) -> list[Schedule]:
    return [Schedule(**dict(r)) for r in await conn.fetch(SQL["list"], name)]


async def delete(conn: Conn, name: str) -> bool:
    return await conn.fetchval(SQL["delete"], name) is not None


async def set_paused(
    conn: Conn, name: str, paused: bool, next_fire_at: datetime | None = None
) -> bool:
    return await conn.fetchval(SQL["set_paused"], name, paused, next_fire_at) is not None


async def claim_due(
    conn: asyncpg.Connection, limit: int
) -> list[tuple[Schedule, datetime]]:
    """The due schedules, locked until the transaction ends, each with the database's
    now() to compute its next fire time from."""
    rows = await conn.fetch(SQL["claim_due"], limit)
    return [(Schedule(**{k: v for k, v in r.items() if k != "db_now"}), r["db_now"])
            for r in rows]


async def advance(
    conn: asyncpg.Connection, name: str, *, next_fire_at: datetime, fired_at: datetime,
    execution_id: uuid.UUID | None,
) -> None:
    """Set the next fire time after a firing (execution_id) or a skip (None)."""
    await conn.execute(SQL["advance"], name, next_fire_at, execution_id, fired_at)


async def skipped(conn: Conn) -> dict[str, int]:
    """Ticks each schedule skipped in a row (its previous firing still going)."""
    return {r["name"]: r["skipped"] for r in await conn.fetch(SQL["skipped"])}

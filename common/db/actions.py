"""Queries on actions (SQL in sql/actions.sql)."""

from __future__ import annotations

from dataclasses import dataclass

from common.db.queries import Conn, load

SQL = load("actions")


@dataclass(frozen=True)
class ActionDefaults:
    name: str
    max_attempts: int
    timeout_s: int


async def upsert(conn: Conn, actions: list[ActionDefaults]) -> None:
    await conn.execute(SQL["upsert"], [a.name for a in actions],
                       [a.max_attempts for a in actions], [a.timeout_s for a in actions])

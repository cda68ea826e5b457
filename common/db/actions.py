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
    await SQL["upsert"].execute(conn, names=[a.name for a in actions],
                                max_attempts=[a.max_attempts for a in actions],
                                timeouts_s=[a.timeout_s for a in actions])

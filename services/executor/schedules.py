"""Interval and cron schedules, fired from a loop of their own (seed 000).

Each due schedule is locked (SKIP LOCKED: executors share the schedules, never a
firing), its firing inserted as an execution whose idempotency key is (schedule, fire
time), and its next fire time set, in one transaction. A previous firing that is still
going is handled by the schedule's overlap policy, never waited for: a stuck run cannot
hold back its schedule's clock, another schedule or dispatch, and the timeout monitor
heals it like any other execution. Repeated skips are logged once a minute, with a count.
"""

from __future__ import annotations

import logging
from datetime import datetime

import asyncpg

from common import cadence, db
from common.db import executions, schedules
from common.loops import RateLimitedLog
from common.metrics import SCHEDULE_FIRINGS, count_moves
from common.models import Overlap, Schedule
from common.submission import Submission

log = logging.getLogger(__name__)

BATCH = 100


def idempotency_key(name: str, fire_at: datetime) -> str:
    return f"schedule:{name}:{fire_at.isoformat()}"


class Scheduler:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._log = RateLimitedLog(log)

    async def fire_due(self) -> None:
        while await self._fire_batch() == BATCH:
            pass

    async def _fire_batch(self) -> int:
        async with db.transaction(self._pool) as conn:
            due = await schedules.claim_due(conn, BATCH)
            for schedule, now in due:
                await self._fire(conn, schedule, now)
        return len(due)

    async def _fire(self, conn: asyncpg.Connection, s: Schedule, now: datetime) -> None:
        fire_at = s.next_fire_at
        upcoming = cadence.next_fire(every_s=s.every_s, cron=s.cron, after=now,
                                     previous=fire_at)
        if s.previous_running and s.overlap == Overlap.SKIP:
            await schedules.advance(conn, s.name, next_fire_at=upcoming, fired_at=fire_at,
                                    execution_id=None)
            SCHEDULE_FIRINGS.labels(s.name, "skipped").inc()
            self._log.log(logging.WARNING, f"schedule_skipped:{s.name}",
                          "schedule %s skipped a firing: its execution %s is still %s",
                          s.name, s.last_execution_id, s.last_status)
            return
        actor = f"schedule:{s.name}"
        if s.previous_running and s.overlap == Overlap.CANCEL_PREVIOUS:
            assert s.last_execution_id is not None
            cancelled = await executions.cancel(conn, s.last_execution_id, actor)
            if cancelled is not None:
                count_moves("cancel", [cancelled])
                SCHEDULE_FIRINGS.labels(s.name, "cancelled_previous").inc()
        [submitted] = await executions.insert(conn, [Submission(
            s.action, s.params, max_attempts=s.max_attempts, timeout_s=s.timeout_s,
            idempotency_key=idempotency_key(s.name, fire_at))], actor)
        await schedules.advance(conn, s.name, next_fire_at=upcoming, fired_at=fire_at,
                                execution_id=submitted.id)
        SCHEDULE_FIRINGS.labels(s.name, "fired").inc()

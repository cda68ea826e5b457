"""The gauges only the database can answer: work in flight per state and action, its
age, workers per status, and ticks each schedule skipped in a row. Every executor
exports them; take max() across replicas."""

from __future__ import annotations

import asyncpg

from common.db import executions, schedules, workers
from common.metrics import EXECUTIONS, OLDEST_EXECUTION, SCHEDULE_SKIPPED, WORKERS
from common.models import WorkerStatus


class Gauges:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._labels: set[tuple[str, str]] = set()

    async def refresh(self) -> None:
        rows = await executions.non_terminal_by_action(self._pool)
        seen = {(str(r.status), r.action) for r in rows}
        for state, action in self._labels - seen:  # drained since: report 0, not stale
            EXECUTIONS.labels(state, action).set(0)
            OLDEST_EXECUTION.labels(state, action).set(0)
        for r in rows:
            EXECUTIONS.labels(r.status, r.action).set(r.count)
            OLDEST_EXECUTION.labels(r.status, r.action).set(r.oldest_s)
        self._labels |= seen
        by_status = await workers.count_by_status(self._pool)
        for status in WorkerStatus:
            WORKERS.labels(status).set(by_status.get(status, 0))
        skipped = await schedules.skipped(self._pool)
        SCHEDULE_SKIPPED.clear()  # a removed schedule's series goes with it
        for name, n in skipped.items():
            SCHEDULE_SKIPPED.labels(name).set(n)

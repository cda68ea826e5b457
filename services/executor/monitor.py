"""The timeout monitor: every non-terminal state has a deadline, enforced here.

Each sweep is a set-based compare-and-set in SQL (see sql/executions.sql), bounded by a
batch size, and logs one line per cause with a count instead of one per execution.
"""

from __future__ import annotations

import logging
import time

import asyncpg

from common.config import ExecutorSettings
from common.db import executions, workers
from common.metrics import count_moves

log = logging.getLogger(__name__)

NEVER_STALE_S = 10.0 * 365 * 86_400


class TimeoutMonitor:
    def __init__(self, pool: asyncpg.Pool, settings: ExecutorSettings, actor: str) -> None:
        self._pool = pool
        self._s = settings
        self._actor = actor
        # Since when this monitor has reached the database without a break. Workers
        # could not heartbeat while it was unreachable either, so their heartbeats are
        # only judged once they have had a full staleness window to catch up.
        self._connected_since: float | None = None

    async def sweep(self) -> None:
        try:
            await self._sweep()
        except BaseException:
            self._connected_since = None
            raise

    def _staleness_window(self) -> float:
        """The staleness window to apply now: the real one once the database has been
        reachable for a whole window, else one so large that nothing is stale."""
        now = time.monotonic()
        if self._connected_since is None:
            self._connected_since = now
        if now - self._connected_since >= self._s.stale_after_s:
            return self._s.stale_after_s
        return NEVER_STALE_S

    async def _sweep(self) -> None:
        s = self._s
        stale_after_s = self._staleness_window()
        lost = await workers.mark_stale_lost(self._pool, stale_after_s)
        if lost:
            log.warning("%d worker(s) LOST after %gs without a heartbeat: %s", len(lost),
                        s.stale_after_s, ", ".join(lost), extra={"event": "workers_stale"})
        sweeps = (
            ("ended_abandoned", logging.WARNING, lambda: executions.end_abandoned_attempts(
                self._pool, stale_after_s=stale_after_s, retry_delay_s=s.lost_retry_delay_s,
                batch=s.monitor_batch_size, actor=self._actor)),
            ("released_stuck_scheduled", logging.INFO, lambda: executions.release_stuck_scheduled(
                self._pool, schedule_to_start_s=s.schedule_to_start_timeout_s,
                stale_after_s=stale_after_s, max_dispatches=s.max_dispatches,
                batch=s.monitor_batch_size, actor=self._actor)),
            ("no_worker", logging.WARNING, lambda: executions.fail_unassignable(
                self._pool, queue_timeout_s=s.queue_timeout_s, batch=s.monitor_batch_size,
                actor=self._actor)),
        )
        for event, level, sweep in sweeps:
            moves = await sweep()
            count_moves(event, moves)
            for m in moves:
                log.log(level, "%d execution(s) %s -> %s (%s)", m.n, m.from_status,
                        m.to_status, m.reason, extra={"event": event})

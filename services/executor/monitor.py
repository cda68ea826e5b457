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
from common.metrics import TRANSITIONS

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
        for status, why, n in await executions.recover_lost_running(
            self._pool, stale_after_s=stale_after_s, retry_delay_s=s.lost_retry_delay_s,
            batch=s.monitor_batch_size, actor=self._actor,
        ):
            TRANSITIONS.labels("RUNNING", status, "worker_lost").inc(n)
            log.warning("%d running execution(s) on a %s worker -> %s", n, why, status,
                        extra={"event": "recovered_lost_running"})
        for status, why, n in await executions.release_stuck_scheduled(
            self._pool, schedule_to_start_s=s.schedule_to_start_timeout_s,
            stale_after_s=stale_after_s, max_dispatches=s.max_dispatches,
            batch=s.monitor_batch_size, actor=self._actor,
        ):
            TRANSITIONS.labels("SCHEDULED", status, why).inc(n)
            log.info("%d scheduled execution(s) never started (%s) -> %s", n, why, status,
                     extra={"event": "released_stuck_scheduled"})
        timed_out = await executions.time_out_running(
            self._pool, batch=s.monitor_batch_size, actor=self._actor
        )
        if timed_out:
            TRANSITIONS.labels("RUNNING", "TIMED_OUT", "start_to_close_timeout").inc(timed_out)
            log.warning("%d execution(s) passed their start-to-close timeout", timed_out,
                        extra={"event": "timed_out"})
        unassignable = await executions.fail_unassignable(
            self._pool, queue_timeout_s=s.queue_timeout_s, batch=s.monitor_batch_size,
            actor=self._actor,
        )
        if unassignable:
            TRANSITIONS.labels("REQUESTED", "FAILED", "no_worker").inc(unassignable)
            log.warning("%d execution(s) found no worker within %gs", unassignable,
                        s.queue_timeout_s, extra={"event": "no_worker"})

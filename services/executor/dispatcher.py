"""Dispatch: REQUESTED -> SCHEDULED in Postgres, then a confirmed publish.

The state is committed before the message is sent. If the publish fails the execution
goes straight back to REQUESTED; if the reply to the COMMIT is lost, the dispatcher asks
which dispatches committed and publishes those; if this process dies in between, the
timeout monitor finds it SCHEDULED and never started, and puts it back.
"""

from __future__ import annotations

import asyncio
import logging
import os

import asyncpg

from common import db
from common.broker import Publisher
from common.config import ExecutorSettings
from common.db import executions, workers
from common.db.pool import CONNECTION_ERRORS
from common.errors import PublishFailed
from common.loops import RateLimitedLog
from common.metrics import DISPATCHED, FENCED_WRITES, PUBLISH_FAILURES, TRANSITIONS
from common.models import DispatchMessage
from services.executor.assign import assign, slots_wanted

log = logging.getLogger(__name__)

# Test-only fault points for the drills: "exit-after-commit" dies after committing
# SCHEDULED, before publishing; "lose-commit-reply" acts once as if the reply to that
# COMMIT was lost with the connection.
FAULT_ENV = "VIGIL_TEST_DISPATCH_FAULT"
# How long to keep asking the database which dispatches committed before giving up
# (the schedule-to-start timeout still recovers them).
COMMIT_CHECK_DEADLINE_S = 30.0


class Dispatcher:
    def __init__(
        self, pool: asyncpg.Pool, publisher: Publisher, settings: ExecutorSettings, actor: str
    ) -> None:
        self._pool = pool
        self._publisher = publisher
        self._settings = settings
        self._actor = actor
        self._publish_log = RateLimitedLog(log)
        self._fault = os.environ.get(FAULT_ENV)

    async def dispatch_due(self) -> None:
        """Dispatch rounds until a round finds nothing more to do."""
        while await self.dispatch_round() >= self._settings.dispatch_batch_size:
            pass

    async def dispatch_round(self) -> int:
        """One batch: claim, assign, commit SCHEDULED, publish. Returns how many."""
        if not self._publisher.connected:
            # Nothing could be delivered: leave the work REQUESTED until the broker is back.
            self._publish_log.log(logging.WARNING, "broker_down",
                                  "dispatch paused: no broker connection")
            return 0
        scheduled: list[executions.Scheduled] = []
        try:
            async with db.transaction(self._pool) as conn:
                eligible = await workers.lock_eligible(conn, self._settings.stale_after_s)
                claimed = await executions.claim_due(
                    conn, slots_wanted(eligible, self._settings.dispatch_batch_size)
                )
                scheduled = await executions.mark_scheduled(
                    conn, assign(claimed, eligible), self._actor
                )
            if scheduled and self._fault == "lose-commit-reply":
                self._fault = None
                raise ConnectionResetError("test fault: the reply to COMMIT was lost")
        except CONNECTION_ERRORS:
            if not scheduled:
                raise
            scheduled = await self._committed(scheduled)
        if not scheduled:
            return 0
        if self._fault == "exit-after-commit":
            os._exit(97)
        TRANSITIONS.labels("REQUESTED", "SCHEDULED", "dispatched").inc(len(scheduled))
        await asyncio.gather(*(self._publish(s) for s in scheduled))
        return len(scheduled)

    async def _committed(
        self, scheduled: list[executions.Scheduled]
    ) -> list[executions.Scheduled]:
        """The connection broke at COMMIT: the reply was lost, maybe not the commit. Publish
        what did commit now, rather than leave it to the schedule-to-start timeout."""
        committed = await db.retrying(
            lambda: executions.committed_dispatches(self._pool, scheduled),
            deadline_s=COMMIT_CHECK_DEADLINE_S, what="check a dispatch commit",
        )
        log.warning("dispatch commit reply lost: %d of %d dispatches had committed",
                    len(committed), len(scheduled), extra={"event": "commit_reply_lost"})
        return committed

    async def _publish(self, s: executions.Scheduled) -> None:
        body = DispatchMessage(
            execution_id=s.id, attempt=s.attempt, dispatch=s.dispatch
        ).model_dump_json().encode()
        try:
            await self._publisher.publish(
                body, s.worker_id, message_id=f"{s.id}/{s.attempt}/{s.dispatch}"
            )
        except PublishFailed as exc:
            PUBLISH_FAILURES.inc()
            self._publish_log.log(logging.WARNING, "publish_failed",
                                  "dispatch of %s to %s failed: %s", s.id, s.worker_id, exc)
            await self._release_unpublished(s)
            return
        DISPATCHED.inc()

    async def _release_unpublished(self, s: executions.Scheduled) -> None:
        try:
            status = await executions.release_scheduled(
                self._pool, execution_id=s.id, attempt=s.attempt, dispatch=s.dispatch,
                worker_id=s.worker_id, reason="publish_failed", actor=self._actor,
                max_dispatches=self._settings.max_dispatches, publish_failed=True,
            )
        except Exception as exc:  # the monitor releases it later instead
            log.warning("could not release %s after a failed publish: %s", s.id, exc)
            return
        if status is None:
            FENCED_WRITES.labels("release").inc()
        else:
            TRANSITIONS.labels("SCHEDULED", status, "publish_failed").inc()

"""Dispatch: REQUESTED -> SCHEDULED in Postgres, then a confirmed publish.

The state is committed before the message is sent. If the publish fails the execution
goes straight back to REQUESTED; if the reply to the COMMIT is lost, the dispatcher asks
which dispatches committed and publishes those; if this process dies in between, the
timeout monitor finds it SCHEDULED and never started, and puts it back.

A round's dispatches to one worker go in one message, and the round's publishes are
confirmed in the background, so the next round need not wait for the broker's confirms:
what a round may dispatch is bounded by the workers' free slots anyway.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import defaultdict

import asyncpg

from common import db
from common.broker import Publisher
from common.config import ExecutorSettings
from common.db import executions
from common.db.pool import CONNECTION_ERRORS
from common.errors import PublishFailed
from common.loops import RateLimitedLog
from common.metrics import DISPATCHED, PUBLISH_FAILURES, count_moves
from common.models import Dispatch, DispatchMessage
from common.state_machine import ExecutionStatus, Moved, Reason

log = logging.getLogger(__name__)

# How long to keep asking the database which dispatches committed before giving up
# (the schedule-to-start timeout still recovers them).
COMMIT_CHECK_DEADLINE_S = 30.0


class DispatchHooks:
    """The seam where the drills inject faults (tests/faults.py); these do nothing."""

    async def after_commit(self, dispatches: list[Dispatch]) -> None:
        """Called once SCHEDULED is committed, before anything is published."""


class Dispatcher:
    def __init__(
        self, pool: asyncpg.Pool, publisher: Publisher, settings: ExecutorSettings, actor: str,
        hooks: DispatchHooks | None = None,
    ) -> None:
        self._pool = pool
        self._publisher = publisher
        self._settings = settings
        self._actor = actor
        self._hooks = hooks or DispatchHooks()
        self._publish_log = RateLimitedLog(log)
        self._publishing: set[asyncio.Task[None]] = set()
        # How long until the next execution that is not due yet (a delay, a retry's
        # backoff) becomes due, as of the last round: dispatch wakes up for it.
        self.next_due_in: float | None = None

    async def dispatch_due(self) -> None:
        """Dispatch rounds until a round finds nothing more to do."""
        while await self.dispatch_round() >= self._settings.dispatch_batch_size:
            pass
        self.next_due_in = await executions.next_due_in(self._pool)

    async def dispatch_round(self) -> int:
        """One batch: claim, assign, commit SCHEDULED (executions.dispatch), then publish.
        Returns how many."""
        if not self._publisher.connected:
            # Nothing could be delivered: leave the work REQUESTED until the broker is back.
            self._publish_log.log(logging.WARNING, "broker_down",
                                  "dispatch paused: no broker connection")
            return 0
        round_id = uuid.uuid4()
        try:
            scheduled = await executions.dispatch(
                self._pool, round_id=round_id, batch=self._settings.dispatch_batch_size,
                stale_after_s=self._settings.stale_after_s, actor=self._actor)
            await self._hooks.after_commit(scheduled)
        except CONNECTION_ERRORS:
            scheduled = await self._committed(round_id)
        if not scheduled:
            return 0
        count_moves("dispatch", [Moved(ExecutionStatus.REQUESTED, ExecutionStatus.SCHEDULED,
                                       Reason.DISPATCHED, len(scheduled))])
        task = asyncio.create_task(self._publish_all(scheduled, round_id), name="publish")
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)
        return len(scheduled)

    async def drain(self) -> None:
        """Wait for the publishes still being confirmed (at shutdown)."""
        if self._publishing:
            await asyncio.wait(list(self._publishing))

    async def _committed(self, round_id: uuid.UUID) -> list[Dispatch]:
        """The connection broke during a round: its reply was lost, maybe not its commit.
        Publish what did commit now, rather than leave it to the schedule-to-start
        timeout."""
        committed = await db.retrying(
            lambda: executions.committed_dispatches(self._pool, round_id),
            deadline_s=COMMIT_CHECK_DEADLINE_S, what="check a dispatch commit",
        )
        if committed:
            log.warning("dispatch reply lost: %d dispatches had committed", len(committed),
                        extra={"event": "commit_reply_lost"})
        return committed

    async def _publish_all(self, scheduled: list[Dispatch], round_id: uuid.UUID) -> None:
        """One message per worker, carrying all of the round's dispatches to it."""
        by_worker: dict[str, list[Dispatch]] = defaultdict(list)
        for d in scheduled:
            by_worker[d.worker_id].append(d)
        results = await asyncio.gather(*(self._publish(worker_id, dispatches, round_id)
                                         for worker_id, dispatches in by_worker.items()))
        failed = [d for ok, dispatches in zip(results, by_worker.values(), strict=True)
                  if not ok for d in dispatches]
        DISPATCHED.inc(len(scheduled) - len(failed))
        if failed:
            await self._release_unpublished(failed)

    async def _publish(self, worker_id: str, dispatches: list[Dispatch],
                       round_id: uuid.UUID) -> bool:
        body = DispatchMessage.of(dispatches).model_dump_json().encode()
        try:
            await self._publisher.publish(body, worker_id, message_id=str(round_id))
        except PublishFailed as exc:
            PUBLISH_FAILURES.inc()
            self._publish_log.log(logging.WARNING, "publish_failed",
                                  "dispatch of %d executions to %s failed: %s",
                                  len(dispatches), worker_id, exc)
            return False
        return True

    async def _release_unpublished(self, failed: list[Dispatch]) -> None:
        try:
            moves = await executions.release_dispatches(
                self._pool, failed, reason=Reason.PUBLISH_FAILED, actor=self._actor,
                max_dispatches=self._settings.max_dispatches,
            )
        except Exception as exc:  # the monitor releases them later instead
            log.warning("could not release %d dispatches after a failed publish: %s",
                        len(failed), exc)
            return
        count_moves("release", moves, attempted=len(failed))

"""Dead-lettered dispatches (expired in a worker queue, or rejected by a worker).

Each goes back to REQUESTED for another worker, guarded by its fencing token; a dead
letter whose execution has moved on, or that is not a dispatch at all, is dropped and
counted.
"""

from __future__ import annotations

import logging

import asyncpg
from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError

from common import db
from common.broker import WORKER_QUEUE_PREFIX
from common.config import ExecutorSettings
from common.db import executions
from common.loops import RateLimitedLog
from common.metrics import BAD_MESSAGES, DEAD_LETTERS, TRANSITIONS
from common.models import DispatchMessage

log = logging.getLogger(__name__)

# Outcomes counted from the start at 0, so that rate() sees the first dead letter.
KNOWN_OUTCOMES = ("stale", "malformed", "foreign", "expired_requested", "expired_failed",
                  "rejected_requested", "rejected_failed")


def death_of(message: AbstractIncomingMessage) -> tuple[str, str | None]:
    """(reason, worker id) from the first x-death entry: why and where it died."""
    deaths = (message.headers or {}).get("x-death") or []
    if not deaths or not isinstance(deaths, list) or not isinstance(deaths[0], dict):
        return "unknown", None
    first = deaths[0]
    queue = str(first.get("queue", ""))
    worker_id = queue[len(WORKER_QUEUE_PREFIX):] if queue.startswith(WORKER_QUEUE_PREFIX) \
        else None
    return str(first.get("reason", "unknown")), worker_id


class DeadLetterHandler:
    def __init__(self, pool: asyncpg.Pool, settings: ExecutorSettings, actor: str) -> None:
        self._pool = pool
        self._settings = settings
        self._actor = actor
        self._bad_log = RateLimitedLog(log)
        for outcome in KNOWN_OUTCOMES:
            DEAD_LETTERS.labels(outcome)

    async def handle(self, message: AbstractIncomingMessage) -> None:
        reason, worker_id = death_of(message)
        try:
            dispatch = DispatchMessage.model_validate_json(message.body)
        except ValidationError:
            await self._drop(message, "malformed")
            return
        if worker_id is None:
            await self._drop(message, "foreign")
            return
        status = await db.retrying(
            lambda: executions.release_scheduled(
                self._pool, execution_id=dispatch.execution_id, attempt=dispatch.attempt,
                dispatch=dispatch.dispatch, worker_id=worker_id,
                reason=f"dead_letter_{reason}", actor=self._actor,
                max_dispatches=self._settings.max_dispatches,
            ),
            deadline_s=60, what="release dead letter",
        )
        if status is None:
            DEAD_LETTERS.labels("stale").inc()
            log.debug("dead letter for %s is stale", dispatch.execution_id)
        else:
            DEAD_LETTERS.labels(f"{reason}_{status.lower()}").inc()
            TRANSITIONS.labels("SCHEDULED", status, f"dead_letter_{reason}").inc()
        await message.ack()

    async def _drop(self, message: AbstractIncomingMessage, kind: str) -> None:
        DEAD_LETTERS.labels(kind).inc()
        BAD_MESSAGES.labels("dead-letters", kind).inc()
        self._bad_log.log(logging.WARNING, f"dead_letter_{kind}",
                          "dropped %s dead letter %s", kind, message.message_id)
        # Acked, not requeued: a message we can't use would only come back forever.
        await message.ack()

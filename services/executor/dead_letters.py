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
from common.db.executions import Dispatch
from common.loops import RateLimitedLog
from common.metrics import BAD_MESSAGES, DEAD_LETTERS, count_moves
from common.models import DispatchMessage
from common.state_machine import DEAD_LETTER_CAUSES, Reason

log = logging.getLogger(__name__)

# RabbitMQ's x-death reasons that Vigil records, each as the reason of its transition.
CAUSES: dict[str, Reason] = {r.removeprefix("dead_letter_"): r for r in DEAD_LETTER_CAUSES}
# Outcomes counted from the start at 0, so that rate() sees the first dead letter.
KNOWN_OUTCOMES = ("stale", "malformed", "foreign",
                  *(f"{cause}_{status}" for cause in CAUSES for status in ("requested", "failed")))


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
        cause, worker_id = death_of(message)
        try:
            dispatch = DispatchMessage.model_validate_json(message.body)
        except ValidationError:
            await self._drop(message, "malformed")
            return
        reason = CAUSES.get(cause)
        if worker_id is None or reason is None:
            await self._drop(message, "foreign")
            return
        token = Dispatch(dispatch.execution_id, dispatch.attempt, dispatch.dispatch, worker_id)
        moves = await db.retrying(
            lambda: executions.release_dispatches(
                self._pool, [token], reason=reason, actor=self._actor,
                max_dispatches=self._settings.max_dispatches,
            ),
            deadline_s=60, what="release dead letter",
        )
        if count_moves("dead_letter", moves, attempted=1):
            DEAD_LETTERS.labels(f"{cause}_{moves[0].to_status.lower()}").inc()
        else:
            DEAD_LETTERS.labels("stale").inc()
            log.debug("dead letter for %s is stale", dispatch.execution_id)
        await message.ack()

    async def _drop(self, message: AbstractIncomingMessage, kind: str) -> None:
        DEAD_LETTERS.labels(kind).inc()
        BAD_MESSAGES.labels("dead-letters", kind).inc()
        self._bad_log.log(logging.WARNING, f"dead_letter_{kind}",
                          "dropped %s dead letter %s", kind, message.message_id)
        # Acked, not requeued: a message we can't use would only come back forever.
        await message.ack()

"""Dead-lettered dispatches (expired in a worker queue, or rejected by a worker).

Each goes back to REQUESTED for another worker, guarded by its fencing token; a dead
letter whose execution has moved on is acked and counted. One this handler cannot use
(too large, not a dispatch, not from a worker queue, or values the database refuses) is
counted and set aside in `vigil.parked` for an operator to read (common/broker.py park).
Whatever arrives, the handler settles it, so nothing comes back to fail again.
"""

from __future__ import annotations

import logging

import asyncpg
from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import AMQPError
from pydantic import ValidationError

from common import broker, db
from common.broker import WORKER_QUEUE_PREFIX
from common.config import ExecutorSettings
from common.db import executions
from common.db.pool import CONNECTION_ERRORS
from common.errors import PublishFailed, describe
from common.loops import RateLimitedLog
from common.metrics import BAD_MESSAGES, DEAD_LETTERS, count_moves
from common.models import MAX_DISPATCHES_PER_MESSAGE, DispatchMessage
from common.state_machine import DEAD_LETTER_CAUSES, Reason

log = logging.getLogger(__name__)

# RabbitMQ's x-death reasons that Vigil records, each as the reason of its transition.
CAUSES: dict[str, Reason] = {r.removeprefix("dead_letter_"): r for r in DEAD_LETTER_CAUSES}
# Outcomes counted from the start at 0, so that rate() sees the first dead letter.
KNOWN_OUTCOMES = ("stale", "oversize", "malformed", "foreign", "refused",
                  *(f"{cause}_{status}" for cause in CAUSES for status in ("requested", "failed")))
# No dispatch message is larger (a pointer is under 100 bytes of JSON): anything that is
# is set aside unparsed.
MAX_DEAD_LETTER_BYTES = 128 * MAX_DISPATCHES_PER_MESSAGE
PARK_TIMEOUT_S = 5.0


def death_of(message: AbstractIncomingMessage) -> tuple[str, str | None]:
    """(reason, worker id) from the first x-death entry: why and where it died."""
    deaths = (message.headers or {}).get("x-death") or []
    if not deaths or not isinstance(deaths, list) or not isinstance(deaths[0], dict):
        return "unknown", None
    first = deaths[0]
    # Anyone who may publish here can write these headers: keep them short.
    queue = str(first.get("queue", ""))[:255]
    worker_id = queue[len(WORKER_QUEUE_PREFIX):] if queue.startswith(WORKER_QUEUE_PREFIX) \
        else None
    return str(first.get("reason", "unknown"))[:255], worker_id


class DeadLetterHandler:
    def __init__(self, pool: asyncpg.Pool, settings: ExecutorSettings, actor: str) -> None:
        self._pool = pool
        self._settings = settings
        self._actor = actor
        self._bad_log = RateLimitedLog(log)
        for outcome in KNOWN_OUTCOMES:
            DEAD_LETTERS.labels(outcome)

    async def handle(self, message: AbstractIncomingMessage) -> None:
        try:
            unusable = await self._release(message)
        except CONNECTION_ERRORS as exc:
            # The database stayed away past the retry deadline: the dead letter is fine,
            # so it goes back to the queue (each round takes that deadline, never hot).
            log.warning("dead letter %s not handled: %s; requeued", message.message_id,
                        describe(exc), extra={"event": "dead_letter_requeued"})
            await message.nack(requeue=True)
            return
        if unusable is None:
            await message.ack()
        else:
            await self._park(message, unusable)

    async def _release(self, message: AbstractIncomingMessage) -> str | None:
        """Put the dispatches a dead letter carries back to REQUESTED (or FAILED); if it
        cannot be used, say why."""
        if len(message.body) > MAX_DEAD_LETTER_BYTES:
            return "oversize"  # not parsed: a hostile size must cost nothing
        try:
            dispatch = DispatchMessage.model_validate_json(message.body)
        except ValidationError:
            return "malformed"
        cause, worker_id = death_of(message)
        reason = CAUSES.get(cause)
        if worker_id is None or reason is None:
            return "foreign"
        tokens = dispatch.tokens(worker_id)
        try:
            moves = await db.retrying(
                lambda: executions.release_dispatches(
                    self._pool, tokens, reason=reason, actor=self._actor,
                    max_dispatches=self._settings.max_dispatches,
                ),
                deadline_s=60, what="release dead letter",
            )
        except asyncpg.DataError:  # e.g. an attempt number past the column's range
            return "refused"
        released = count_moves("dead_letter", moves, attempted=len(tokens))
        for m in moves:
            DEAD_LETTERS.labels(f"{cause}_{m.to_status.lower()}").inc(m.n)
        if released < len(tokens):  # started meanwhile, or moved on: nothing to do
            DEAD_LETTERS.labels("stale").inc(len(tokens) - released)
        return None

    async def _park(self, message: AbstractIncomingMessage, kind: str) -> None:
        DEAD_LETTERS.labels(kind).inc()
        BAD_MESSAGES.labels("dead-letters", kind).inc()
        cause, worker_id = death_of(message)
        try:
            await broker.park(message, {"vigil-parked-as": kind, "vigil-dead-letter-cause": cause,
                                        "vigil-worker": worker_id or ""}, PARK_TIMEOUT_S)
        except (PublishFailed, *broker.CONNECTION_ERRORS, AMQPError) as exc:
            self._bad_log.log(logging.WARNING, "park_failed",
                              "could not park %s dead letter %s: %s; dropped", kind,
                              message.message_id, describe(exc))
            # Not requeued: a message we can't use would only come back forever.
            await message.reject(requeue=False)
            return
        self._bad_log.log(logging.WARNING, f"dead_letter_{kind}",
                          "parked %s dead letter %s (%d bytes) in %s", kind,
                          message.message_id, len(message.body), broker.PARKED_QUEUE)

"""Worker loss from the broker's own events (seed 001), seen in about a second.

The rabbitmq_event_exchange plugin publishes an event the moment a worker's connection
drops: `connection.closed` (carrying the connection name the worker chose, which ends
in its id) and `consumer.deleted` for its queue (performed by `rmq-internal` when the
channel died rather than the worker cancelling). A worker that shut down cleanly is
INACTIVE by then, so only a crash or a kill turns an ACTIVE or DRAINING worker LOST; the
heartbeat staleness check stays as the backstop for when events are off or missed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import asyncpg
from aio_pika.abc import AbstractIncomingMessage

from common.broker import WORKER_CONNECTION_PREFIX, WORKER_QUEUE_PREFIX
from common.db import workers

log = logging.getLogger(__name__)

EVENTS = ("connection.closed", "consumer.deleted")
# Who the broker says deleted a consumer when its channel or connection went away.
BROKER_INTERNAL = "rmq-internal"


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value if isinstance(value, str) else None


def lost_worker(routing_key: str, headers: dict, vhost: str) -> str | None:
    """The id of the worker an event says is gone, or None if it says nothing of ours."""
    if routing_key == "connection.closed":
        name = _text(headers.get("user_provided_name"))
        if name and name.startswith(WORKER_CONNECTION_PREFIX):
            return name.rsplit(" ", 1)[-1]
        return None
    if routing_key == "consumer.deleted":
        queue = _text(headers.get("queue")) or ""
        if (queue.startswith(WORKER_QUEUE_PREFIX) and _text(headers.get("vhost")) == vhost
                and _text(headers.get("user_who_performed_action")) == BROKER_INTERNAL):
            return queue[len(WORKER_QUEUE_PREFIX):]
    return None


class WorkerEventHandler:
    def __init__(self, pool: asyncpg.Pool, on_lost: Callable[[], None], vhost: str) -> None:
        self._pool = pool
        self._on_lost = on_lost
        self._vhost = vhost

    async def handle(self, message: AbstractIncomingMessage) -> None:
        async with message.process(requeue=False):
            worker_id = lost_worker(message.routing_key or "", dict(message.headers or {}),
                                    self._vhost)
            if worker_id is None:
                return
            if await workers.mark_lost(self._pool, worker_id, f"broker: {message.routing_key}"):
                log.warning("worker %s LOST: %s", worker_id, message.routing_key,
                            extra={"event": "worker_lost"})
                self._on_lost()

"""Worker loss from the broker's own events (seed 001), seen in about a second.

The rabbitmq_event_exchange plugin publishes `connection.closed` the moment a worker's
connection drops. A worker that shut down cleanly is INACTIVE by then, so only a crash
(or a kill) turns an ACTIVE or DRAINING worker LOST; the heartbeat staleness check stays
as the backstop for when events are off or missed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import asyncpg
from aio_pika.abc import AbstractIncomingMessage

from common.broker import WORKER_CONNECTION_PREFIX
from common.db import workers

log = logging.getLogger(__name__)

EVENT_EXCHANGE = "amq.rabbitmq.event"

def worker_id_of(headers: dict) -> str | None:
    """The worker id from a connection event's headers, or None for other clients."""
    name = headers.get("user_provided_name")
    if not name:
        props = headers.get("client_properties") or {}
        name = props.get("connection_name") if isinstance(props, dict) else None
    if isinstance(name, bytes):
        name = name.decode(errors="replace")
    if not isinstance(name, str) or not name.startswith(WORKER_CONNECTION_PREFIX):
        return None
    return name.rsplit(" ", 1)[-1]


class WorkerEventHandler:
    def __init__(self, pool: asyncpg.Pool, on_lost: Callable[[], None], vhost: str) -> None:
        self._pool = pool
        self._on_lost = on_lost
        self._vhost = vhost

    async def handle(self, message: AbstractIncomingMessage) -> None:
        async with message.process(requeue=False):
            headers = dict(message.headers or {})
            vhost = headers.get("vhost")
            if isinstance(vhost, bytes):
                vhost = vhost.decode(errors="replace")
            worker_id = worker_id_of(headers)
            if worker_id is None or vhost != self._vhost:
                return
            if await workers.mark_lost(self._pool, worker_id, "broker connection closed"):
                log.warning("worker %s LOST: its broker connection closed", worker_id,
                            extra={"event": "worker_lost"})
                self._on_lost()

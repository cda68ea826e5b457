"""The executor process: independent loops over one pool and one broker connection.

Dispatch, the timeout monitor, schedules, retention, dead-letter handling and worker
events each run on their own (seed 000): one stuck or failing loop never holds up
another. Any number of executors may run; they share nothing but Postgres rows, guarded
by compare-and-set.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection

from common import broker, db
from common.config import BrokerRole, BrokerSettings, DatabaseSettings, ExecutorSettings
from common.loops import run_loop
from services.executor.dead_letters import DeadLetterHandler
from services.executor.dispatcher import Dispatcher, DispatchHooks
from services.executor.gauges import Gauges
from services.executor.monitor import TimeoutMonitor
from services.executor.retention import Retention
from services.executor.schedules import Scheduler
from services.executor.worker_events import EVENTS, WorkerEventHandler

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "vigil_dispatch"
LISTENER_CHECK_INTERVAL_S = 1.0
CONSUMERS_CHECK_INTERVAL_S = 1.0
GAUGES_INTERVAL_S = 5.0
# Schedules fire at whole seconds (intervals) or minutes (cron).
SCHEDULES_INTERVAL_S = 1.0


@dataclass
class _Consumer:
    queue: AbstractQueue
    tag: str
    callback: Callable[[AbstractIncomingMessage], Any]


class Executor:
    def __init__(
        self, settings: ExecutorSettings, db_settings: DatabaseSettings,
        broker_settings: BrokerSettings, hooks: DispatchHooks | None = None,
    ) -> None:
        self.settings = settings
        self.hooks = hooks
        self.dispatcher: Dispatcher | None = None
        self.db_settings = db_settings
        self.broker_settings = broker_settings
        self.id = f"{settings.name}-{uuid.uuid4().hex[:8]}"
        self.actor = f"executor:{self.id}"
        self._dispatch_now = asyncio.Event()
        self._sweep_now = asyncio.Event()
        self._stop_loops = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._pool: asyncpg.Pool | None = None
        self._connections: list[AbstractRobustConnection] = []
        self._listener: asyncpg.Connection | None = None
        # aio-pika restores channels, queues and consumers after a reconnect only while
        # something still references them.
        self._keep: list[object] = []
        self._consumers: list[_Consumer] = []

    async def start(self) -> None:
        s = self.settings
        pool = self._pool = await db.connect(
            self.db_settings, application_name=f"vigil-executor {self.id}"
        )
        connection = await broker.connect(self.broker_settings, BrokerRole.EXECUTOR,
                                          f"vigil-executor {self.id}")
        self._connections.append(connection)

        publish_channel = await connection.channel(publisher_confirms=True,
                                                   on_return_raises=True)
        dispatch_exchange = await broker.declare_topology(publish_channel)
        publisher = broker.Publisher(connection, dispatch_exchange,
                                     self.broker_settings.publish_timeout_s)
        dispatcher = self.dispatcher = Dispatcher(pool, publisher, s, self.actor, self.hooks)
        monitor = TimeoutMonitor(pool, s, self.actor)

        consume_channel = await connection.channel()
        # Dead letters may be large (up to the broker's message size): a few at a time.
        await consume_channel.set_qos(prefetch_count=16)
        dead_letters = await consume_channel.declare_queue(broker.DEAD_LETTER_QUEUE, durable=True)
        await self._consume(dead_letters, DeadLetterHandler(pool, s, self.actor).handle)
        self._keep += [publish_channel, dispatch_exchange, consume_channel, dead_letters]
        if s.worker_events:
            await self._follow_worker_events()

        retention = Retention(pool, s)
        self._tasks = [
            self._loop("dispatch", dispatcher.dispatch_due, self._dispatch_interval,
                       self._dispatch_now),
            self._loop("timeout_monitor", monitor.sweep, s.monitor_interval_s, self._sweep_now),
            self._loop("dispatch_listener", self._keep_listening, LISTENER_CHECK_INTERVAL_S),
            self._loop("consumers", self._keep_consuming, CONSUMERS_CHECK_INTERVAL_S),
            self._loop("gauges", Gauges(pool).refresh, GAUGES_INTERVAL_S),
            self._loop("schedules", Scheduler(pool).fire_due, SCHEDULES_INTERVAL_S),
            self._loop("retention", retention.prune, s.retention_interval_s, retention.more),
        ]
        log.info("executor %s ready", self.id, extra={"event": "executor_ready"})

    def _dispatch_interval(self) -> float:
        """The poll interval, or less if a delayed execution is due before then."""
        assert self.dispatcher is not None
        next_due = self.dispatcher.next_due_in
        poll = self.settings.dispatch_poll_interval_s
        return poll if next_due is None else max(0.0, min(poll, next_due))

    def _loop(
        self, name: str, body: Callable[[], Awaitable[None]],
        interval_s: float | Callable[[], float], wake: asyncio.Event | None = None,
    ) -> asyncio.Task[None]:
        return asyncio.create_task(
            run_loop(name, body, interval_s=interval_s, stop=self._stop_loops, wake=wake),
            name=name,
        )

    async def _follow_worker_events(self) -> None:
        """Bind a private queue to the broker's connection and consumer events. They are
        published in one vhost (event_exchange.vhost) for every vhost."""
        connection = await broker.connect(
            self.broker_settings, BrokerRole.EXECUTOR, f"vigil-executor-events {self.id}",
            vhost=self.broker_settings.event_vhost,
        )
        self._connections.append(connection)
        channel = await connection.channel()
        queue = await channel.declare_queue(
            broker.executor_events_queue(self.id), exclusive=True, auto_delete=True
        )
        for event in EVENTS:
            await queue.bind(broker.EVENT_EXCHANGE, routing_key=event)
        self._keep += [channel, queue]
        assert self._pool is not None
        handler = WorkerEventHandler(self._pool, self._sweep_now.set,
                                     vhost=self.broker_settings.vhost)
        await self._consume(queue, handler.handle)

    async def _consume(
        self, queue: AbstractQueue, callback: Callable[[AbstractIncomingMessage], Any],
    ) -> None:
        self._consumers.append(_Consumer(queue, await queue.consume(callback), callback))

    async def _keep_consuming(self) -> None:
        """Consume again where the broker cancelled a consumer (broker.keep_consuming)."""
        for c in self._consumers:
            c.tag = await broker.keep_consuming(c.queue, c.tag, c.callback)

    async def _keep_listening(self) -> None:
        """Hold a LISTEN connection so new work wakes dispatch at once; reconnect it
        after a database restart (the poll interval covers the gap)."""
        if self._listener is not None and not self._listener.is_closed():
            return
        conn = await asyncpg.connect(
            host=self.db_settings.host, port=self.db_settings.port,
            user=self.db_settings.user, password=self.db_settings.password.get_secret_value(),
            database=self.db_settings.name, timeout=self.db_settings.connect_timeout_s,
        )
        await conn.add_listener(NOTIFY_CHANNEL, lambda *_: self._dispatch_now.set())
        self._listener = conn
        self._dispatch_now.set()  # anything committed while we were not listening

    async def shutdown(self) -> None:
        self._stop_loops.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.dispatcher is not None:
            await self.dispatcher.drain()
        for connection in self._connections:
            await connection.close()
        if self._listener is not None and not self._listener.is_closed():
            await self._listener.close()
        if self._pool is not None:
            await self._pool.close()
        log.info("executor %s stopped", self.id, extra={"event": "executor_stopped"})

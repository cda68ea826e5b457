"""Vigil's parts driven in the test's own event loop, against the real servers.

A dispatcher whose rounds the test runs one at a time, a timeout monitor it sweeps when
it likes, and a real worker (real queue, real pooled children) started in-process: state
machine paths that take a drill seconds take milliseconds here. The subprocess drills
stay for what needs a real process to die.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from common import broker
from common.config import BrokerRole, ExecutorSettings, WorkerSettings
from services.executor.dispatcher import Dispatcher, DispatchHooks
from services.executor.monitor import TimeoutMonitor
from services.worker.service import Worker
from tests.harness import FAST_TIMINGS, Env

# The tests' fast timings, as settings objects rather than environment variables.
_PREFIXES = {"VIGIL_EXECUTOR_": ExecutorSettings, "VIGIL_WORKER_": WorkerSettings}


def fast(cls: type[Any], **overrides: Any) -> Any:
    prefix = next(p for p, c in _PREFIXES.items() if c is cls)
    timings = {k.removeprefix(prefix).lower(): v for k, v in FAST_TIMINGS.items()
               if k.startswith(prefix)}
    return cls(**{**timings, **overrides})


@asynccontextmanager
async def dispatcher(env: Env, hooks: DispatchHooks | None = None,
                     **settings: Any) -> AsyncIterator[Dispatcher]:
    """A dispatcher publishing to this test's vhost; the test calls dispatch_round()."""
    assert env.pool is not None
    connection = await broker.connect(env.broker, BrokerRole.EXECUTOR, "vigil-tests dispatcher")
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await broker.declare_topology(channel)
        publisher = broker.Publisher(connection, exchange, env.broker.publish_timeout_s)
        d = Dispatcher(env.pool, publisher, fast(ExecutorSettings, **settings),
                       actor="executor:tests", hooks=hooks)
        yield d
        await d.drain()
    finally:
        await connection.close()


def monitor(env: Env, **settings: Any) -> TimeoutMonitor:
    assert env.pool is not None
    return TimeoutMonitor(env.pool, fast(ExecutorSettings, **settings), actor="monitor:tests")


@asynccontextmanager
async def worker(env: Env, worker_class: type[Worker] = Worker,
                 **settings: Any) -> AsyncIterator[Worker]:
    """A real worker, started in this event loop: it registers, consumes its own queue
    and runs attempts in its pooled children."""
    w = worker_class(fast(WorkerSettings, **{"name": "inprocess", "capacity": 2, **settings}),
                     env.db, env.broker)
    await w.start()
    try:
        yield w
    finally:
        await w.shutdown()

"""The worker process: register, heartbeat, consume, run attempts, drain on SIGTERM.

Order matters (seed 004): actions are loaded and the worker is registered with its
queue bound *before* it consumes, so it never receives work it cannot handle.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from pydantic import ValidationError

from common import broker, db
from common.config import BrokerRole, BrokerSettings, DatabaseSettings, WorkerSettings
from common.db import actions, executions, workers
from common.errors import describe
from common.loops import RateLimitedLog, run_loop
from common.metrics import (
    BAD_MESSAGES,
    FENCED_WRITES,
    RUN_TIME,
    SCHEDULE_TO_START,
    TRANSITIONS,
    WORKER_CAPACITY,
    WORKER_IN_FLIGHT,
    WORKER_MEMORY,
    WORKER_PRESSURE,
)
from common.models import DispatchMessage, ExecutionStatus, WorkerStatus
from services.worker import memory, registry, runtimes
from services.worker.forkserver import ForkServer

log = logging.getLogger(__name__)

# How long a worker keeps retrying a state write while Postgres is unreachable.
DB_RETRY_DEADLINE_S = 120.0


@dataclass
class Running:
    """One attempt in progress on this worker."""

    execution_id: uuid.UUID
    attempt: int
    task: asyncio.Task[None] = field(repr=False)
    # Why the task was cancelled: "not_owned" (someone else moved it: write nothing)
    # or "shutdown" (grace expired: release it for retry).
    cancel_reason: str | None = None


class Worker:
    def __init__(
        self, settings: WorkerSettings, db_settings: DatabaseSettings,
        broker_settings: BrokerSettings,
    ) -> None:
        self.settings = settings
        self.db_settings = db_settings
        self.broker_settings = broker_settings
        self.id = f"{settings.name}-{uuid.uuid4().hex[:8]}"
        self.offered = self._offered_actions()
        self.running: dict[uuid.UUID, Running] = {}
        self._deliveries: set[asyncio.Task[None]] = set()
        # Dispatches between their delivery and their entry in `running`.
        self._claiming: set[DispatchMessage] = set()
        self.draining = asyncio.Event()
        self._slots = asyncio.Semaphore(settings.capacity)
        self._gate = memory.MemoryGate(settings.memory_high_ratio, settings.memory_low_ratio)
        self._heartbeat_now = asyncio.Event()
        self._pool: asyncpg.Pool | None = None
        self._forkserver = (ForkServer(settings.action_modules)
                            if "python" in settings.runtimes else None)
        self._connection: AbstractRobustConnection | None = None
        # Referenced so that aio-pika restores them after a reconnect.
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._loops: list[asyncio.Task[None]] = []
        self._loops_stop = asyncio.Event()
        self._bad_log = RateLimitedLog(log)
        WORKER_CAPACITY.set(settings.capacity)

    def _offered_actions(self) -> list[registry.ActionSpec]:
        offered: list[registry.ActionSpec] = []
        if "shell" in self.settings.runtimes:
            offered.append(registry.ActionSpec(runtimes.SHELL_ACTION, None))
        if "python" in self.settings.runtimes:
            specs = registry.load(self.settings.action_modules)
            offered.extend(specs[name] for name in sorted(specs))
        return offered

    @property
    def pool(self) -> asyncpg.Pool:
        assert self._pool is not None, "worker not started"
        return self._pool

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        if self._forkserver is not None:
            await self._forkserver.start()
        self._pool = await db.connect(self.db_settings, application_name=f"vigil-worker {self.id}")
        self._connection = await broker.connect(
            self.broker_settings, BrokerRole.WORKER,
            broker.worker_connection_name(self.settings.name, self.id),
        )
        channel = self._channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=self.settings.capacity)
        self._queue = await broker.declare_worker_queue(channel, self.id)
        await actions.upsert(self.pool, [
            actions.ActionDefaults(a.name, a.max_attempts, a.timeout_s) for a in self.offered
        ])
        await workers.register(self.pool, workers.Registration(
            id=self.id, name=self.settings.name, hostname=socket.gethostname(), pid=os.getpid(),
            runtimes=list(self.settings.runtimes), actions=[a.name for a in self.offered],
            capacity=self.settings.capacity,
        ))
        self._loops = [
            asyncio.create_task(run_loop(
                "worker_heartbeat", self._heartbeat, stop=self._loops_stop,
                interval_s=self.settings.heartbeat_interval_s, wake=self._heartbeat_now,
            ), name="worker_heartbeat"),
            asyncio.create_task(run_loop(
                "worker_ownership", self._check_ownership, stop=self._loops_stop,
                interval_s=self.settings.ownership_check_interval_s,
            ), name="worker_ownership"),
        ]
        self._consumer_tag = await self._queue.consume(self._on_message)
        log.info("worker %s ready: capacity %d, actions %s", self.id, self.settings.capacity,
                 ", ".join(a.name for a in self.offered), extra={"event": "worker_ready"})

    async def shutdown(self) -> None:
        """DRAINING -> stop consuming -> reject unstarted -> wait up to the grace ->
        release the rest for retry -> INACTIVE."""
        grace = self.settings.shutdown_grace_s
        log.info("worker %s draining (grace %gs, %d running)", self.id, grace,
                 len(self.running), extra={"event": "worker_draining"})
        self.draining.set()
        await self._set_status(WorkerStatus.DRAINING, "shutdown requested")
        if self._queue is not None and self._consumer_tag is not None:
            try:
                await asyncio.wait_for(self._queue.cancel(self._consumer_tag), 5)
            except Exception as exc:  # the broker may be gone; the DB status still stops work
                log.warning("could not cancel consumer: %s", describe(exc))
        if self._deliveries:  # deliveries in hand see `draining` and go back at once
            await asyncio.wait(list(self._deliveries), timeout=5)
        tasks = [r.task for r in self.running.values()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for r in list(self.running.values()):
                if r.task in pending:
                    r.cancel_reason = "shutdown"
                    r.task.cancel()
            if pending:
                await asyncio.wait(pending)
        self._loops_stop.set()
        await asyncio.gather(*self._loops, return_exceptions=True)
        await self._set_status(WorkerStatus.INACTIVE, "shut down")
        if self._connection is not None:
            await self._connection.close()
        if self._pool is not None:
            await self._pool.close()
        if self._forkserver is not None:
            await self._forkserver.close()
        log.info("worker %s stopped", self.id, extra={"event": "worker_stopped"})

    async def _set_status(self, status: WorkerStatus, reason: str) -> None:
        try:
            await db.retrying(lambda: workers.set_status(self.pool, self.id, status, reason),
                              deadline_s=10, what=f"mark worker {status}")
        except Exception as exc:
            log.error("could not mark worker %s %s: %s", self.id, status, describe(exc))

    # ---- loops -----------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        sample = memory.sample()
        self._gate.update(sample)
        WORKER_MEMORY.set(sample.used_bytes or 0)
        WORKER_PRESSURE.set(1 if self._gate.under_pressure else 0)
        status = await workers.heartbeat(
            self.pool, self.id, memory_bytes=sample.used_bytes,
            memory_limit_bytes=sample.limit_bytes, memory_pressure=self._gate.under_pressure,
        )
        if status is None:
            log.warning("worker %s has no live row; the executor will not route to it", self.id)

    async def _check_ownership(self) -> None:
        """Kill attempts this worker no longer owns: cancelled, timed out, or reassigned
        after it was presumed lost; release those it owns but lost track of. Also
        watches memory between heartbeats."""
        if self._gate.update(memory.sample()):
            self._heartbeat_now.set()
        await self._release_unknown()
        if not self.running:
            return
        lost = await executions.running_not_owned(
            self.pool, self.id, {r.execution_id: r.attempt for r in self.running.values()}
        )
        for execution_id in lost:
            r = self.running.get(execution_id)
            if r is not None and not r.task.done():
                log.info("execution %s attempt %d is no longer ours; killing it",
                         execution_id, r.attempt, extra={"event": "attempt_revoked"})
                r.cancel_reason = "not_owned"
                r.task.cancel()

    async def _release_unknown(self) -> None:
        known = [*self.running, *(d.execution_id for d in self._claiming)]
        for execution_id, attempt, dispatch in await executions.running_unknown(
            self.pool, self.id, known
        ):
            log.warning("execution %s attempt %d is RUNNING here by the database's books "
                        "but not the worker's; releasing it for retry", execution_id, attempt,
                        extra={"event": "attempt_orphaned"})
            error = {"kind": "orphaned", "message": "the worker lost track of this attempt"}
            token = DispatchMessage(execution_id=execution_id, attempt=attempt,
                                    dispatch=dispatch)
            await self._finish(token, ExecutionStatus.FAILED, 0.0, None, error, "orphaned")

    # ---- deliveries ------------------------------------------------------------------

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        # aio-pika cancels this callback when the channel closes. The delivery is handled
        # in a task of our own, so a RUNNING that gets committed always gets its attempt.
        task = asyncio.create_task(self._handle_delivery(message))
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)
        await asyncio.shield(task)

    async def _handle_delivery(self, message: AbstractIncomingMessage) -> None:
        try:
            dispatch = DispatchMessage.model_validate_json(message.body)
        except ValidationError as exc:
            self._reject_bad(message, "malformed", describe(exc))
            await _settle(message, ack=False)
            return
        current = self.running.get(dispatch.execution_id)
        if dispatch in self._claiming or (current and current.attempt == dispatch.attempt):
            # A redelivery (the ack was lost with the connection) of work already ours.
            self._reject_bad(message, "duplicate", f"execution {dispatch.execution_id} "
                             f"attempt {dispatch.attempt} is already running here")
            await _settle(message, ack=False)
            return
        if not await self._take_slot():
            # Draining, or no memory to spare: the dead-letter exchange hands it back to
            # the executor at once, which redispatches it elsewhere.
            await _settle(message, ack=False)
            return
        self._claiming.add(dispatch)
        try:
            await self._claim(message, dispatch)
        finally:
            self._claiming.discard(dispatch)

    async def _claim(self, message: AbstractIncomingMessage, dispatch: DispatchMessage) -> None:
        """SCHEDULED -> RUNNING, then start the attempt and ack. Holds a slot."""
        try:
            started = await db.retrying(
                lambda: executions.start(
                    self.pool, execution_id=dispatch.execution_id, attempt=dispatch.attempt,
                    dispatch=dispatch.dispatch, worker_id=self.id,
                ),
                deadline_s=DB_RETRY_DEADLINE_S, what="start attempt",
            )
        except Exception as exc:
            self._slots.release()
            log.error("could not start %s: %s", dispatch.execution_id, describe(exc))
            await _settle(message, ack=False)
            return
        if started is None:
            self._slots.release()
            FENCED_WRITES.labels("start").inc()
            self._reject_bad(message, "stale", f"execution {dispatch.execution_id} "
                             f"attempt {dispatch.attempt} dispatch {dispatch.dispatch}")
            await _settle(message, ack=False)
            return
        # RUNNING is committed: from here Postgres owns the attempt, not the broker.
        task = asyncio.create_task(
            self._run_attempt(started, dispatch.dispatch), name=f"attempt-{started.id}"
        )
        self.running[started.id] = Running(started.id, started.attempt, task)
        WORKER_IN_FLIGHT.set(len(self.running))
        task.add_done_callback(lambda _: self._attempt_done(started.id))
        TRANSITIONS.labels("SCHEDULED", "RUNNING", "started").inc()
        if message.timestamp is not None:
            SCHEDULE_TO_START.observe(max(0.0, time.time() - message.timestamp.timestamp()))
        await _settle(message, ack=True)

    async def _take_slot(self) -> bool:
        """Wait for a free slot; False if the worker starts draining (or is short of
        memory) first."""
        if self.draining.is_set() or self._gate.under_pressure:
            return False
        acquire = asyncio.ensure_future(self._slots.acquire())
        drain = asyncio.ensure_future(self.draining.wait())
        await asyncio.wait({acquire, drain}, return_when=asyncio.FIRST_COMPLETED)
        drain.cancel()
        if not acquire.done():
            acquire.cancel()
            return False
        if self.draining.is_set():
            self._slots.release()
            return False
        return True

    def _attempt_done(self, execution_id: uuid.UUID) -> None:
        self.running.pop(execution_id, None)
        self._slots.release()
        WORKER_IN_FLIGHT.set(len(self.running))

    def _reject_bad(self, message: AbstractIncomingMessage, kind: str, detail: str) -> None:
        BAD_MESSAGES.labels("worker", kind).inc()
        self._bad_log.log(logging.WARNING, f"bad_message:{kind}",
                          "rejected %s message %s: %s", kind, message.message_id, detail)

    # ---- one attempt -----------------------------------------------------------------

    async def _run_attempt(self, started: executions.Started, dispatch: int) -> None:
        began = time.monotonic()
        if started.attempt == 1 and started.checkpoint is not None:
            # A first attempt must start from nothing (seed 004): this is a bug, loudly.
            outcome = runtimes.Outcome(False, error={
                "kind": "bug", "message": "first attempt carries a checkpoint"})
        else:
            try:
                outcome = await runtimes.run(
                    runtimes.Attempt(str(started.id), started.action, started.params,
                                     started.attempt, started.checkpoint),
                    forkserver=self._forkserver,
                    tail_bytes=self.settings.output_tail_bytes,
                    on_checkpoint=lambda data: self._save_checkpoint(started, data),
                )
            except asyncio.CancelledError:
                await asyncio.shield(self._on_cancelled(started, dispatch))
                return
        RUN_TIME.labels(started.action, outcome.reason).observe(time.monotonic() - began)
        await asyncio.shield(self._record(started, dispatch, outcome))

    async def _record(
        self, started: executions.Started, dispatch: int, outcome: runtimes.Outcome
    ) -> None:
        retry_delay = self._retry_delay(started.attempt) if outcome.retryable else None
        status = ExecutionStatus.SUCCEEDED if outcome.ok else ExecutionStatus.FAILED
        await self._finish(_token(started, dispatch), status, retry_delay, outcome.result,
                           outcome.error, outcome.reason)

    async def _on_cancelled(self, started: executions.Started, dispatch: int) -> None:
        r = self.running.get(started.id)
        if r is None or r.cancel_reason != "shutdown":
            return  # not ours any more: whoever moved it owns the outcome
        error = {"kind": "worker_shutdown",
                 "message": f"not finished within the {self.settings.shutdown_grace_s:g}s "
                            "shutdown grace; killed"}
        await self._finish(_token(started, dispatch), ExecutionStatus.FAILED, 0.0, None, error,
                           "worker_shutdown")

    async def _finish(
        self, token: DispatchMessage, status: ExecutionStatus, retry_delay: float | None,
        result: Any, error: Any, reason: str,
    ) -> None:
        """Record an attempt's outcome, fenced by its token."""
        try:
            new_status = await db.retrying(
                lambda: executions.finish(
                    self.pool, execution_id=token.execution_id, attempt=token.attempt,
                    dispatch=token.dispatch, worker_id=self.id, status=status,
                    retry_delay_s=retry_delay, result=result, error=error, reason=reason,
                ),
                deadline_s=DB_RETRY_DEADLINE_S, what="record outcome",
            )
        except Exception as exc:
            log.error("could not record the outcome of %s: %s; it will be released as "
                      "orphaned", token.execution_id, describe(exc))
            return
        if new_status is None:
            FENCED_WRITES.labels("finish").inc()
            log.debug("outcome of %s attempt %d fenced out", token.execution_id, token.attempt)
            return
        TRANSITIONS.labels("RUNNING", new_status, reason).inc()

    async def _save_checkpoint(self, started: executions.Started, data: Any) -> None:
        saved = await executions.save_checkpoint(
            self.pool, execution_id=started.id, attempt=started.attempt, worker_id=self.id,
            checkpoint=data,
        )
        if not saved:
            FENCED_WRITES.labels("checkpoint").inc()

    def _retry_delay(self, attempt: int) -> float:
        """Exponential backoff with full jitter."""
        ceiling = min(self.settings.retry_max_delay_s,
                      self.settings.retry_base_delay_s * 2 ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)


async def _settle(message: AbstractIncomingMessage, *, ack: bool) -> None:
    """Ack, or reject to the dead-letter exchange. If the channel is gone, the broker has
    already put the delivery back; its redelivery will be found stale."""
    try:
        if ack:
            await message.ack()
        else:
            await message.reject(requeue=False)
    except Exception as exc:
        log.info("could not %s delivery %s: %s", "ack" if ack else "reject",
                 message.message_id, describe(exc))


def _token(started: executions.Started, dispatch: int) -> DispatchMessage:
    return DispatchMessage(execution_id=started.id, attempt=started.attempt, dispatch=dispatch)

"""The worker process: register, heartbeat, consume, run attempts, drain on SIGTERM.

Order matters (seed 004): the actions are imported and the python children forked
from them, and the worker is registered with its queue bound, *before* it consumes, so
it never receives work it cannot handle.

The hot path writes in groups (common/batching.py): the SCHEDULED -> RUNNING of every
delivery that arrives while the previous start is being committed goes in one statement,
and so do the outcomes of attempts that end together; each row is still fenced by its
own token, and each delivery is acked only once its RUNNING is committed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
import uuid
from collections import deque
from collections.abc import Coroutine
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

from common import actions, broker, db
from common.batching import Batcher
from common.config import BrokerRole, BrokerSettings, DatabaseSettings, WorkerSettings
from common.db import actions as action_rows
from common.db import executions, workers
from common.db.executions import Dispatch, Ended, Started
from common.errors import describe
from common.loops import RateLimitedLog, run_loop
from common.metrics import (
    BAD_MESSAGES,
    BATCH_SIZE,
    RUN_TIME,
    SCHEDULE_TO_START,
    WORKER_CAPACITY,
    WORKER_IN_FLIGHT,
    WORKER_MEMORY,
    WORKER_PRESSURE,
    count_moves,
)
from common.models import DispatchMessage, WorkerStatus
from common.state_machine import AttemptError, ErrorKind, ExecutionStatus, Moved, Reason
from services.worker import memory, runtimes
from services.worker.forkserver import ForkServer
from services.worker.pool import ChildPool

log = logging.getLogger(__name__)

# How long a worker keeps retrying a state write while Postgres is unreachable.
DB_RETRY_DEADLINE_S = 120.0
# A dispatch message is ~120 bytes of JSON; anything much larger is not one.
MAX_MESSAGE_BYTES = 4096
# Most rows in one grouped write.
MAX_BATCH = 256


@dataclass(frozen=True)
class Delivery:
    """A dispatch this worker received and has not started yet."""

    message: AbstractIncomingMessage
    token: Dispatch


@dataclass
class Running:
    """One attempt in progress on this worker."""

    token: Dispatch
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
        # Deliveries held until a child is free (up to `prefetch` of them, so that a
        # child never waits for the next dispatch), and every dispatch between its
        # delivery and its entry in `running`.
        self._waiting: deque[Delivery] = deque()
        self._held: set[Dispatch] = set()
        self._free = settings.capacity  # attempts that may start now
        self.draining = asyncio.Event()
        self._gate = memory.MemoryGate(settings.memory_high_ratio, settings.memory_low_ratio)
        self._heartbeat_now = asyncio.Event()
        self._pool: asyncpg.Pool | None = None
        self._children: ChildPool | None = None
        self._forkserver = (ForkServer(settings.action_modules)
                            if "python" in settings.runtimes else None)
        self._runtimes: runtimes.Runtimes | None = None
        self._connection: AbstractRobustConnection | None = None
        # Referenced so that aio-pika restores them after a reconnect.
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._loops: list[asyncio.Task[None]] = []
        self._loops_stop = asyncio.Event()
        self._bad_log = RateLimitedLog(log)
        self._starts = Batcher("start", self._write_starts, max_batch=MAX_BATCH)
        self._ends = Batcher("end", self._write_ends, max_batch=MAX_BATCH)
        WORKER_CAPACITY.set(settings.capacity)

    def _offered_actions(self) -> dict[str, actions.ActionSpec]:
        offered: dict[str, actions.ActionSpec] = {}
        if "shell" in self.settings.runtimes:
            offered[runtimes.SHELL_ACTION] = actions.ActionSpec(runtimes.SHELL_ACTION, None)
        if "python" in self.settings.runtimes:
            offered.update(sorted(actions.load(self.settings.action_modules).items()))
        return offered

    @property
    def pool(self) -> asyncpg.Pool:
        assert self._pool is not None, "worker not started"
        return self._pool

    @property
    def child_pids(self) -> list[int]:
        return self._children.pids if self._children is not None else []

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self._close_children()  # a worker that could not start leaves nothing
            raise

    async def _start(self) -> None:
        s = self.settings
        if self._forkserver is not None:
            self._children = ChildPool(
                self._forkserver, s.capacity, max_attempts_per_child=s.child_max_attempts,
                recycle_rss_bytes=_bytes(s.child_max_rss_mb), tail_bytes=s.output_tail_bytes)
            await self._children.start()
        self._runtimes = runtimes.Runtimes(self._children, s.output_tail_bytes,
                                           s.checkpoint_limit_bytes)
        self._pool = await db.connect(self.db_settings, application_name=f"vigil-worker {self.id}")
        self._connection = await broker.connect(
            self.broker_settings, BrokerRole.WORKER,
            broker.worker_connection_name(s.name, self.id),
        )
        channel = self._channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=s.capacity + s.prefetch)
        self._queue = await broker.declare_worker_queue(channel, self.id)
        await action_rows.upsert(self.pool, [
            action_rows.ActionDefaults(a.name, a.max_attempts, a.timeout_s)
            for a in self.offered.values()
        ])
        await workers.register(self.pool, workers.Registration(
            id=self.id, name=s.name, hostname=socket.gethostname(), pid=os.getpid(),
            runtimes=list(s.runtimes), actions=list(self.offered), capacity=s.capacity,
            prefetch=s.prefetch,
        ))
        self._loops = [
            asyncio.create_task(run_loop(
                "worker_heartbeat", self._heartbeat, stop=self._loops_stop,
                interval_s=s.heartbeat_interval_s, wake=self._heartbeat_now,
            ), name="worker_heartbeat"),
            asyncio.create_task(run_loop(
                "worker_ownership", self._check_ownership, stop=self._loops_stop,
                interval_s=s.ownership_check_interval_s,
            ), name="worker_ownership"),
        ]
        self._consumer_tag = await self._queue.consume(self._on_message)
        log.info("worker %s ready: capacity %d, actions %s", self.id, s.capacity,
                 ", ".join(self.offered), extra={"event": "worker_ready"})

    async def shutdown(self) -> None:
        """DRAINING -> stop consuming -> give back unstarted deliveries -> wait up to the
        grace -> release the rest for retry -> INACTIVE."""
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
        await self._give_back_waiting(Reason.REFUSED_DRAINING)
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
        await self._starts.close()
        await self._ends.close()
        await self._set_status(WorkerStatus.INACTIVE, "shut down")
        if self._connection is not None:
            await self._connection.close()
        if self._pool is not None:
            await self._pool.close()
        await self._close_children()
        log.info("worker %s stopped", self.id, extra={"event": "worker_stopped"})

    async def _close_children(self) -> None:
        if self._children is not None:
            await self._children.close()
        if self._forkserver is not None:
            await self._forkserver.close()

    async def _set_status(self, status: WorkerStatus, reason: str) -> None:
        try:
            await db.retrying(lambda: workers.set_status(self.pool, self.id, status, reason),
                              deadline_s=10, what=f"mark worker {status}")
        except Exception as exc:
            log.error("could not mark worker %s %s: %s", self.id, status, describe(exc))

    # ---- loops -----------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        sample = memory.sample()
        await self._watch_memory(sample)
        WORKER_MEMORY.set(sample.used_bytes or 0)
        WORKER_PRESSURE.set(1 if self._gate.under_pressure else 0)
        status = await workers.heartbeat(
            self.pool, self.id, memory_bytes=sample.used_bytes,
            memory_limit_bytes=sample.limit_bytes, memory_pressure=self._gate.under_pressure,
        )
        if status is None:
            log.warning("worker %s has no live row; the executor will not route to it", self.id)

    async def _watch_memory(self, sample: memory.MemorySample) -> bool:
        """Feed the memory gate; when it closes, what is held goes elsewhere. True when
        it changed."""
        changed = self._gate.update(sample)
        if changed and self._gate.under_pressure:
            log.warning("worker %s short of memory (%s of %s bytes): taking no new work",
                        self.id, sample.used_bytes, sample.limit_bytes,
                        extra={"event": "memory_pressure"})
            await self._give_back_waiting(Reason.REFUSED_MEMORY)
        elif changed:
            log.info("worker %s has memory again: taking work", self.id,
                     extra={"event": "memory_pressure_over"})
        return changed

    async def _check_ownership(self) -> None:
        """Kill attempts this worker no longer owns: cancelled, timed out, or reassigned
        after it was presumed lost; release those it owns but lost track of. Also
        watches memory between heartbeats."""
        if await self._watch_memory(memory.sample()):
            self._heartbeat_now.set()
        await self._release_unknown()
        if not self.running:
            return
        lost = await executions.running_not_owned(
            self.pool, self.id, {r.token.id: r.token.attempt for r in self.running.values()}
        )
        for execution_id in lost:
            r = self.running.get(execution_id)
            if r is not None and not r.task.done():
                log.info("execution %s attempt %d is no longer ours; killing it",
                         execution_id, r.token.attempt, extra={"event": "attempt_revoked"})
                r.cancel_reason = "not_owned"
                r.task.cancel()

    async def _release_unknown(self) -> None:
        known = [*self.running, *(d.id for d in self._held)]
        for token in await executions.running_unknown(self.pool, self.id, known,
                                                       self.settings.orphan_grace_s):
            log.warning("execution %s attempt %d is RUNNING here by the database's books "
                        "but not the worker's; releasing it for retry", token.id,
                        token.attempt, extra={"event": "attempt_orphaned"})
            await self._end(Ended(
                token.id, token.attempt, token.dispatch, ExecutionStatus.FAILED,
                error=AttemptError(kind=ErrorKind.ORPHANED,
                                   message="the worker lost track of this attempt"),
                retry_delay_s=0.0))

    # ---- deliveries ------------------------------------------------------------------

    def _on_message(self, message: AbstractIncomingMessage) -> None:
        # Plain (not async), so aio-pika runs it without a task of its own. The delivery
        # is handled in a task of ours: aio-pika cancels its callbacks when the channel
        # closes, and a RUNNING that gets committed must always get its attempt.
        self._track(self._accept(message))

    def _track(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    async def _accept(self, message: AbstractIncomingMessage) -> None:
        """Check a delivery and hold it until a child is free; give it back at once if
        this worker is stopping or short of memory."""
        if len(message.body) > MAX_MESSAGE_BYTES:
            await self._reject_bad(message, "oversize", f"{len(message.body)} bytes")
            return
        try:
            dispatch = DispatchMessage.model_validate_json(message.body)
        except ValidationError as exc:
            await self._reject_bad(message, "malformed", describe(exc))
            return
        token = Dispatch(dispatch.execution_id, dispatch.attempt, dispatch.dispatch, self.id)
        current = self.running.get(token.id)
        if token in self._held or (current is not None and current.token == token):
            # A redelivery (the ack was lost with the connection) of work already ours.
            await self._reject_bad(message, "duplicate", f"execution {token.id} attempt "
                                   f"{token.attempt} is already here")
            return
        refusal = self._refusal()
        if refusal is not None:
            await self._give_back([Delivery(message, token)], refusal)
            return
        self._held.add(token)
        self._waiting.append(Delivery(message, token))
        self._start_waiting()

    def _refusal(self) -> Reason | None:
        """Why this worker takes no new work now, if it does not."""
        if self.draining.is_set():
            return Reason.REFUSED_DRAINING
        if self._gate.under_pressure:
            return Reason.REFUSED_MEMORY
        return None

    def _start_waiting(self) -> None:
        """Start held deliveries, oldest first, while children are free."""
        while self._free > 0 and self._waiting:
            self._free -= 1
            self._track(self._begin(self._waiting.popleft()))

    async def _begin(self, d: Delivery) -> None:
        """SCHEDULED -> RUNNING (with whatever else starts now), then run the attempt and
        ack. Holds a child."""
        try:
            started = await self._starts.submit(d.token)
        except Exception as exc:
            log.error("could not start %s: %s", d.token.id, describe(exc))
            started = None
            await _settle(d.message, ack=False)
        else:
            if started is None:
                count_moves("start", [], attempted=1)
                await self._reject_bad(d.message, "stale", f"execution {d.token.id} attempt "
                                       f"{d.token.attempt} dispatch {d.token.dispatch}")
        finally:
            self._held.discard(d.token)
        if started is None:
            self._child_free()
            return
        # RUNNING is committed: from here Postgres owns the attempt, not the broker.
        task = asyncio.create_task(self._run_attempt(started), name=f"attempt-{started.id}")
        self.running[started.id] = Running(d.token, task)
        WORKER_IN_FLIGHT.set(len(self.running))
        task.add_done_callback(lambda _: self._attempt_done(started.id))
        count_moves("start", [Moved(ExecutionStatus.SCHEDULED, ExecutionStatus.RUNNING,
                                    Reason.STARTED)])
        if d.message.timestamp is not None:
            SCHEDULE_TO_START.observe(max(0.0, time.time() - d.message.timestamp.timestamp()))
        await _settle(d.message, ack=True)

    async def _give_back_waiting(self, why: Reason) -> None:
        """Hand every held delivery back (the worker is stopping, or short of memory)."""
        waiting, self._waiting = list(self._waiting), deque()
        if waiting:
            await self._give_back(waiting, why)

    async def _give_back(self, deliveries: list[Delivery], why: Reason) -> None:
        """Hand unstarted deliveries back for another worker at once, without counting
        them as deliveries: REQUESTED again in Postgres, then ack. If the database can't
        be reached, reject them: the dead-letter exchange takes them to an executor."""
        tokens = [d.token for d in deliveries]
        try:
            moves = await executions.release_dispatches(
                self.pool, tokens, reason=why, actor=f"worker:{self.id}")
        except Exception as exc:
            log.warning("could not give back %d deliveries (%s): %s", len(tokens), why,
                        describe(exc))
            moves = None
        else:
            count_moves("give_back", moves, attempted=len(tokens))
        for d in deliveries:
            self._held.discard(d.token)
            await _settle(d.message, ack=moves is not None)

    def _attempt_done(self, execution_id: uuid.UUID) -> None:
        self.running.pop(execution_id, None)
        WORKER_IN_FLIGHT.set(len(self.running))
        self._child_free()

    def _child_free(self) -> None:
        self._free += 1
        self._start_waiting()

    async def _reject_bad(self, message: AbstractIncomingMessage, kind: str, detail: str) -> None:
        """Count and set aside a delivery this worker cannot use: rejected without requeue,
        the dead-letter exchange takes it to the executors."""
        BAD_MESSAGES.labels("worker", kind).inc()
        self._bad_log.log(logging.WARNING, f"bad_message:{kind}",
                          "rejected %s message %s: %s", kind, message.message_id, detail)
        await _settle(message, ack=False)

    # ---- grouped writes ----------------------------------------------------------------

    async def _write_starts(self, tokens: list[Dispatch]) -> list[Started | None]:
        BATCH_SIZE.labels("start").observe(len(tokens))
        started = await db.retrying(lambda: executions.start(self.pool, tokens, self.id),
                                    deadline_s=DB_RETRY_DEADLINE_S, what="start attempts")
        by_id = {s.id: s for s in started}
        return [by_id.get(t.id) for t in tokens]

    async def _write_ends(self, ended: list[Ended]) -> list[Moved | None]:
        BATCH_SIZE.labels("end").observe(len(ended))
        moved = await db.retrying(lambda: executions.end_attempts(self.pool, ended, self.id),
                                  deadline_s=DB_RETRY_DEADLINE_S, what="record outcomes")
        return [moved.get(e.id) for e in ended]

    # ---- one attempt -----------------------------------------------------------------

    async def _run_attempt(self, started: Started) -> None:
        began = time.monotonic()
        spec = self.offered.get(started.action)
        assert self._runtimes is not None
        bug = _broken_resume(started, spec)
        if bug is not None:
            outcome = runtimes.failed(ErrorKind.BUG, bug)
        else:
            try:
                outcome = await self._runtimes.run(
                    runtimes.Attempt(str(started.id), started.action, started.params,
                                     started.attempt, started.checkpoint,
                                     self._memory_limit(spec)),
                    on_checkpoint=lambda data: self._save_checkpoint(started, data),
                )
            except asyncio.CancelledError:
                await asyncio.shield(self._on_cancelled(started))
                return
        RUN_TIME.labels(started.action, outcome.reason).observe(time.monotonic() - began)
        await asyncio.shield(self._end(Ended(
            started.id, started.attempt, started.dispatch,
            ExecutionStatus.SUCCEEDED if outcome.ok else ExecutionStatus.FAILED,
            result=outcome.result, error=outcome.error,
            retry_delay_s=None if outcome.ok else self._retry_delay(started.attempt),
            usage=outcome.usage)))

    def _memory_limit(self, spec: actions.ActionSpec | None) -> int | None:
        declared = spec.memory_limit_mb if spec is not None else None
        return _bytes(declared or self.settings.attempt_memory_limit_mb)

    async def _on_cancelled(self, started: Started) -> None:
        r = self.running.get(started.id)
        if r is None or r.cancel_reason != "shutdown":
            return  # not ours any more: whoever moved it owns the outcome
        await self._end(Ended(
            started.id, started.attempt, started.dispatch, ExecutionStatus.FAILED,
            error=AttemptError(
                kind=ErrorKind.WORKER_SHUTDOWN,
                message=f"not finished within the {self.settings.shutdown_grace_s:g}s "
                        "shutdown grace; killed"),
            retry_delay_s=0.0))

    async def _end(self, ended: Ended) -> None:
        """Record an attempt's outcome, fenced by its token."""
        try:
            moved = await self._ends.submit(ended)
        except Exception as exc:
            log.error("could not record the outcome of %s: %s; it will be released as "
                      "orphaned", ended.id, describe(exc))
            return
        if count_moves("finish", [moved] if moved else [], attempted=1) == 0:
            log.debug("outcome of %s attempt %d fenced out", ended.id, ended.attempt)

    async def _save_checkpoint(self, started: Started, data: Any) -> None:
        saved = await executions.save_checkpoint(
            self.pool, execution_id=started.id, attempt=started.attempt, worker_id=self.id,
            checkpoint=data,
        )
        count_moves("checkpoint", [], attempted=0 if saved else 1)

    def _retry_delay(self, attempt: int) -> float:
        """Exponential backoff with full jitter."""
        ceiling = min(self.settings.retry_max_delay_s,
                      self.settings.retry_base_delay_s * 2 ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)


def _broken_resume(started: Started, spec: actions.ActionSpec | None) -> str | None:
    """The guards of seed 004: a first attempt starts from nothing, and a resumable
    action's retry resumes from what an earlier attempt saved. Either broken is a bug in
    Vigil, failed loudly rather than run from the wrong place."""
    if started.attempt == 1 and started.checkpoint is not None:
        return "first attempt carries a checkpoint"
    if (spec is not None and spec.resumable and started.checkpoint is None
            and started.checkpoint_attempt is not None):
        return (f"attempt {started.attempt} would start over: attempt "
                f"{started.checkpoint_attempt} saved a checkpoint that is missing")
    return None


def _bytes(mb: int | None) -> int | None:
    return None if mb is None else mb * 2**20


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

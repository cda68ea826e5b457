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
from common.db.executions import Ended, Started
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
    labelled,
)
from common.models import Dispatch, DispatchMessage, WorkerStatus
from common.state_machine import AttemptError, ErrorKind, ExecutionStatus, Moved, Reason
from services.worker import memory, runtimes
from services.worker.forkserver import ForkServer
from services.worker.pool import ChildPool

log = logging.getLogger(__name__)

# How long a worker keeps retrying a state write while Postgres is unreachable.
DB_RETRY_DEADLINE_S = 120.0
# A dispatch message carries at most capacity + prefetch pointers of under 100 bytes of
# JSON each: anything larger than this is not one, and is set aside before it is parsed.
MAX_MESSAGE_BYTES = 1_048_576
# Most rows in one grouped write.
MAX_BATCH = 256


@dataclass
class Delivery:
    """A message from this worker's queue. It is settled once every dispatch in it has
    been started, found stale or given back: acked, or, if one of them could not be
    handed over for lack of the database, rejected to the dead-letter exchange (whose
    executor releases whatever of it is still SCHEDULED)."""

    message: AbstractIncomingMessage
    unsettled: int
    failed: bool = False

    async def settle(self, *, failed: bool = False) -> None:
        self.failed |= failed
        self.unsettled -= 1
        if self.unsettled == 0:
            await _settle(self.message, ack=not self.failed)


@dataclass(frozen=True)
class Held:
    """A dispatch this worker received and has not started yet."""

    token: Dispatch
    delivery: Delivery = field(compare=False)


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
        # Dispatches held until a child is free (up to `prefetch` of them, so that a
        # child never waits for the next dispatch), and every dispatch between its
        # delivery and its entry in `running`.
        self._waiting: deque[Held] = deque()
        self._held: set[Dispatch] = set()
        self._free = settings.capacity  # attempts that may start now
        self.draining = asyncio.Event()
        self._gate = memory.MemoryGate(settings.memory_high_ratio, settings.memory_low_ratio)
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
        # Starts and outcomes go to Postgres together: one statement per moment.
        self._writes: Batcher[Dispatch | Ended, Started | Moved | None] = Batcher(
            "sync", self._sync, max_batch=MAX_BATCH)
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
                                           s.checkpoint_limit_bytes, s.result_limit_bytes)
        self._pool = await db.connect(self.db_settings, application_name=f"vigil-worker {self.id}")
        self._connection = await broker.connect(
            self.broker_settings, BrokerRole.WORKER,
            broker.worker_connection_name(s.name, self.id),
        )
        channel = self._channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=s.capacity + s.held_dispatches)
        self._queue = await broker.declare_worker_queue(channel, self.id)
        await action_rows.upsert(self.pool, [
            action_rows.ActionDefaults(a.name, a.max_attempts, a.timeout_s)
            for a in self.offered.values()
        ])
        await workers.register(self.pool, workers.Registration(
            id=self.id, name=s.name, hostname=socket.gethostname(), pid=os.getpid(),
            runtimes=list(s.runtimes), actions=list(self.offered), capacity=s.capacity,
            prefetch=s.held_dispatches,
        ))
        self._loops = [
            asyncio.create_task(run_loop(
                "worker_heartbeat", self._heartbeat, stop=self._loops_stop,
                interval_s=s.heartbeat_interval_s,
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
        await self._writes.close()
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
        sample = memory.sample(self.settings.memory_budget_mb)
        if not await self._watch_memory(sample):
            await self._beat(sample)

    async def _beat(self, sample: memory.MemorySample) -> None:
        """Write the heartbeat row: alive (by database time), memory, pressure."""
        WORKER_MEMORY.set(sample.used_bytes or 0)
        WORKER_PRESSURE.set(1 if self._gate.under_pressure else 0)
        status = await workers.heartbeat(
            self.pool, self.id, memory_bytes=sample.used_bytes,
            memory_limit_bytes=sample.limit_bytes, memory_pressure=self._gate.under_pressure,
        )
        if status is None:
            log.warning("worker %s has no live row; the executor will not route to it", self.id)

    async def _watch_memory(self, sample: memory.MemorySample) -> bool:
        """Feed the memory gate; True when it opened or closed. A change is written to
        the heartbeat row at once, and only then is what is held given back, so that
        dispatch, which skips a worker under pressure, does not send it straight back."""
        if not self._gate.update(sample):
            return False
        await self._beat(sample)
        if self._gate.under_pressure:
            log.warning("worker %s short of memory (%s of %s bytes): taking no new work",
                        self.id, sample.used_bytes, sample.limit_bytes,
                        extra={"event": "memory_pressure"})
            await self._give_back_waiting(Reason.REFUSED_MEMORY)
        else:
            log.info("worker %s has memory again: taking work", self.id,
                     extra={"event": "memory_pressure_over"})
        return True

    async def _check_ownership(self) -> None:
        """Kill attempts this worker no longer owns: cancelled, timed out, or reassigned
        after it was presumed lost; release those it owns but lost track of. Also
        watches memory between heartbeats, and that the broker still delivers to it."""
        await self._watch_memory(memory.sample(self.settings.memory_budget_mb))
        await self._keep_consuming()
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

    async def _keep_consuming(self) -> None:
        if self._queue is not None and self._consumer_tag is not None \
                and not self.draining.is_set():
            self._consumer_tag = await broker.keep_consuming(self._queue, self._consumer_tag,
                                                             self._on_message)

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
        """Check a message and hold its dispatches until children are free; give them
        back at once if this worker is stopping or short of memory."""
        if len(message.body) > MAX_MESSAGE_BYTES:
            await self._reject_bad(message, "oversize", f"{len(message.body)} bytes")
            return
        try:
            tokens = DispatchMessage.model_validate_json(message.body).tokens(self.id)
        except ValidationError as exc:
            await self._reject_bad(message, "malformed", describe(exc))
            return
        delivery = Delivery(message, unsettled=len(tokens))
        fresh = []
        for token in tokens:
            current = self.running.get(token.id)
            if token in self._held or (current is not None and current.token == token):
                # A redelivery (the ack was lost with the connection) of work already ours.
                self._count_bad("duplicate", f"execution {token.id} attempt {token.attempt} "
                                "is already here")
                await delivery.settle()
            else:
                fresh.append(Held(token, delivery))
        refusal = self._refusal()
        if refusal is not None:
            await self._give_back(fresh, refusal)
            return
        for held in fresh:
            self._held.add(held.token)
            self._waiting.append(held)
        self._start_waiting()

    def _refusal(self) -> Reason | None:
        """Why this worker takes no new work now, if it does not."""
        if self.draining.is_set():
            return Reason.REFUSED_DRAINING
        if self._gate.under_pressure:
            return Reason.REFUSED_MEMORY
        return None

    def _start_waiting(self) -> None:
        """Start held dispatches, oldest first, while children are free."""
        while self._free > 0 and self._waiting:
            self._free -= 1
            self._track(self._begin(self._waiting.popleft()))

    async def _begin(self, held: Held) -> None:
        """SCHEDULED -> RUNNING (with whatever else starts now), then run the attempt.
        Holds a child."""
        token = held.token
        try:
            started = await self._writes.submit(token)
        except Exception as exc:  # the dead-letter exchange hands it back to an executor
            log.error("could not start %s: %s", token.id, describe(exc))
            await held.delivery.settle(failed=True)
            started = None
        else:
            if started is None:  # moved on since it was dispatched: nothing to run
                count_moves("start", [], attempted=1)
                self._count_bad("stale", f"execution {token.id} attempt {token.attempt} "
                                f"dispatch {token.dispatch}")
                await held.delivery.settle()
        finally:
            self._held.discard(token)
        if started is None:
            self._child_free()
            return
        # RUNNING is committed: from here Postgres owns the attempt, not the broker. This
        # task goes on as the attempt's own, referenced by `running`.
        task = asyncio.current_task()
        assert task is not None
        self._deliveries.discard(task)
        self.running[started.id] = Running(token, task)
        WORKER_IN_FLIGHT.set(len(self.running))
        count_moves("start", [Moved(ExecutionStatus.SCHEDULED, ExecutionStatus.RUNNING,
                                    Reason.STARTED)])
        sent = held.delivery.message.timestamp
        if sent is not None:
            SCHEDULE_TO_START.observe(max(0.0, time.time() - sent.timestamp()))
        try:
            await self._run_attempt(started, held.delivery)
        finally:
            self._attempt_done(started.id)

    async def _give_back_waiting(self, why: Reason) -> None:
        """Hand every held dispatch back (the worker is stopping, or short of memory)."""
        waiting, self._waiting = list(self._waiting), deque()
        if waiting:
            await self._give_back(waiting, why)

    async def _give_back(self, held: list[Held], why: Reason) -> None:
        """Hand unstarted dispatches back for another worker at once, without counting
        them as deliveries: REQUESTED again in Postgres. If the database can't be
        reached, their message is rejected: the dead-letter exchange takes it to an
        executor."""
        if not held:
            return
        tokens = [h.token for h in held]
        try:
            moves = await executions.release_dispatches(
                self.pool, tokens, reason=why, actor=f"worker:{self.id}")
        except Exception as exc:
            log.warning("could not give back %d dispatches (%s): %s", len(tokens), why,
                        describe(exc))
            moves = None
        else:
            count_moves("give_back", moves, attempted=len(tokens))
        for h in held:
            self._held.discard(h.token)
            await h.delivery.settle(failed=moves is None)

    def _attempt_done(self, execution_id: uuid.UUID) -> None:
        self.running.pop(execution_id, None)
        WORKER_IN_FLIGHT.set(len(self.running))
        self._child_free()

    def _child_free(self) -> None:
        self._free += 1
        self._start_waiting()

    def _count_bad(self, kind: str, detail: str) -> None:
        BAD_MESSAGES.labels("worker", kind).inc()
        self._bad_log.log(logging.WARNING, f"bad_message:{kind}", "set aside %s: %s", kind,
                          detail)

    async def _reject_bad(self, message: AbstractIncomingMessage, kind: str, detail: str) -> None:
        """Count and set aside a message this worker cannot use: rejected without requeue,
        the dead-letter exchange takes it to the executors."""
        self._count_bad(kind, f"message {message.message_id}: {detail}")
        await _settle(message, ack=False)

    # ---- grouped writes ----------------------------------------------------------------

    async def _sync(self, items: list[Dispatch | Ended]) -> list[Started | Moved | None]:
        labelled(BATCH_SIZE, "sync").observe(len(items))
        starts = [i for i in items if isinstance(i, Dispatch)]
        ends = [i for i in items if isinstance(i, Ended)]
        synced = await db.retrying(
            lambda: executions.sync(self.pool, self.id, starts=starts, ends=ends),
            deadline_s=DB_RETRY_DEADLINE_S, what="record starts and outcomes")
        return [synced.started.get(i.id) if isinstance(i, Dispatch) else synced.ended.get(i.id)
                for i in items]

    # ---- one attempt -----------------------------------------------------------------

    async def _run_attempt(self, started: Started, delivery: Delivery) -> None:
        began = time.monotonic()
        spec = self.offered.get(started.action)
        assert self._runtimes is not None
        bug = _broken_resume(started, spec)
        if bug is not None:
            await delivery.settle()
            outcome = runtimes.failed(ErrorKind.BUG, bug)
        else:
            try:
                await delivery.settle()
                outcome = await self._runtimes.run(
                    runtimes.Attempt(str(started.id), started.action, started.params,
                                     started.attempt, started.checkpoint,
                                     self._memory_limit(spec)),
                    on_checkpoint=lambda data: self._save_checkpoint(started, data),
                )
            except asyncio.CancelledError:
                await asyncio.shield(self._on_cancelled(started))
                return
            except Exception as exc:  # ended now, rather than left to the orphan sweep
                log.exception("attempt %d of %s could not be run", started.attempt, started.id)
                outcome = runtimes.failed(ErrorKind.BUG,
                                          f"the worker could not run it: {describe(exc)}")
        labelled(RUN_TIME, started.action, outcome.reason).observe(time.monotonic() - began)
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
            moved = await self._writes.submit(ended)
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

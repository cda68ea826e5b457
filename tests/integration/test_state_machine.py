"""The state machine's hard paths, driven in-process (tests/inprocess.py) against the real
servers: fenced late writes, a lost COMMIT reply, a start whose reply was lost, an
attempt its worker lost track of, refusals that do not count, poison pills. Every test
in the suite also has its history checked against TRANSITIONS (tests/conftest.py)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import aio_pika
from aio_pika.abc import AbstractIncomingMessage
from prometheus_client import REGISTRY

from common import broker
from common.config import BrokerRole, WorkerSettings
from common.db import executions
from common.db.executions import Ended, Started
from common.models import Dispatch, DispatchMessage, Pointer
from common.state_machine import (
    TRANSITIONS,
    AttemptError,
    ErrorKind,
    ExecutionStatus,
    Moved,
    Reason,
)
from services.cli.docs import TRANSITIONS_BEGIN, TRANSITIONS_END, render_transitions
from services.worker.service import Worker
from tests import inprocess
from tests.faults import LoseCommitReply
from tests.harness import Env, deaf_worker, management, wait_until

ARCHITECTURE = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


def test_the_architecture_doc_shows_the_transition_table() -> None:
    text = ARCHITECTURE.read_text()
    section = text[text.index(TRANSITIONS_BEGIN):text.index(TRANSITIONS_END) + len(
        TRANSITIONS_END)]
    assert section == render_transitions(), "run `make docs` and commit docs/architecture.md"
    assert len(set(TRANSITIONS)) == len(TRANSITIONS), "a transition is listed twice"


async def status_of(env: Env, eid: uuid.UUID) -> str:
    return await env.pool.fetchval("SELECT status FROM executions WHERE id = $1", eid)


async def scheduled_by_hand(env: Env, eid: uuid.UUID, worker_id: str) -> Dispatch:
    """Put an execution in SCHEDULED as a dispatcher would, without a dispatcher."""
    await env.pool.execute(
        "UPDATE executions SET status = 'SCHEDULED', worker_id = $2, dispatches = 1 "
        "WHERE id = $1", eid, worker_id)
    return Dispatch(eid, 1, 1, worker_id)


async def test_a_stale_token_changes_nothing(env: Env):
    [eid] = await env.submit("demo.noop")
    token = await scheduled_by_hand(env, eid, "w-a")

    async def start(attempt: int, worker: str) -> list[Started]:
        synced = await executions.sync(env.pool, worker,
                                       starts=[Dispatch(eid, attempt, 1, "w-a")])
        return list(synced.started.values())

    assert await start(1, "w-b") == []  # wrong worker
    assert await start(2, "w-a") == []  # wrong attempt
    assert len(await start(1, "w-a")) == 1
    # The same token again (a retry after a lost reply) gets the row, and records nothing.
    assert len(await start(1, "w-a")) == 1
    assert await env.pool.fetchval(
        "SELECT count(*) FROM execution_history WHERE execution_id = $1 "
        "AND to_status = 'RUNNING'", eid) == 1
    before = await executions.get(env.pool, eid)
    late = Ended(eid, 1, 1, ExecutionStatus.SUCCEEDED, result={"x": 1})
    assert (await executions.sync(env.pool, "w-b", ends=[late])).ended == {}
    assert await executions.release_dispatches(
        env.pool, [token], reason=Reason.DEAD_LETTER_EXPIRED, actor="t", max_dispatches=5) == []
    assert await executions.get(env.pool, eid) == before


async def test_a_zombies_late_outcome_is_fenced_after_its_attempt_was_given_up(env: Env):
    [eid] = await env.submit("demo.noop", max_attempts=2)
    await scheduled_by_hand(env, eid, "w-zombie")
    await executions.sync(env.pool, "w-zombie", starts=[Dispatch(eid, 1, 1, "w-zombie")])
    # Its worker stops answering: the monitor retries the attempt elsewhere.
    await env.pool.execute(
        "INSERT INTO workers (id, name, hostname, pid, status, runtimes, actions, capacity) "
        "VALUES ('w-zombie', 'z', 'h', 1, 'LOST', '{python}', '{demo.noop}', 1)")
    await inprocess.monitor(env).sweep()
    assert (await status_of(env, eid), (await executions.get(env.pool, eid)).attempt) == (
        "REQUESTED", 2)
    # It wakes and reports attempt 1 as done: nothing changes.
    late = Ended(eid, 1, 1, ExecutionStatus.SUCCEEDED, result={"late": True})
    assert (await executions.sync(env.pool, "w-zombie", ends=[late])).ended == {}
    e = await executions.get(env.pool, eid)
    assert (e.status, e.attempt, e.result, e.reason) == ("REQUESTED", 2, None, "worker_lost")


async def test_a_lost_commit_reply_publishes_what_committed_at_once(env: Env):
    ids = await env.submit("demo.noop", n=3)
    async with deaf_worker(env, ["demo.noop"], message_ttl_ms=60_000) as deaf, \
            inprocess.dispatcher(env, hooks=LoseCommitReply()) as d:
        assert await d.dispatch_round() == 3
        await d.drain()
        queued = await _queued(env, deaf.id)
    assert sorted(p.execution_id for p in queued) == sorted(ids), \
        "each committed dispatch was published, not left to the monitor"
    assert {await status_of(env, e) for e in ids} == {"SCHEDULED"}
    assert await env.pool.fetchval(
        "SELECT count(*) FROM execution_history WHERE to_status = 'REQUESTED' "
        "AND from_status = 'SCHEDULED'") == 0


async def _queued(env: Env, worker_id: str) -> list[Pointer]:
    """The dispatches waiting in a worker's queue (taken off it)."""
    connection = await broker.connect(env.broker, BrokerRole.WORKER, "vigil-tests count")
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(broker.worker_queue(worker_id), passive=True)
        pointers: list[Pointer] = []
        while (message := await queue.get(fail=False, no_ack=True)) is not None:
            pointers += DispatchMessage.model_validate_json(message.body).dispatches
        return pointers
    finally:
        await connection.close()


class ReplyLostOnFirstStart(Worker):
    """A worker whose first start commits but whose reply is lost: the write is retried
    whole, as db.retrying does after a connection error at COMMIT."""

    lost = False

    async def _sync(self, items: list[Dispatch | Ended]) -> list[Started | Moved | None]:
        if not self.lost and any(isinstance(i, Dispatch) for i in items):
            self.lost = True
            await super()._sync(items)  # committed; the reply never arrives
        return await super()._sync(items)


async def test_a_start_whose_reply_was_lost_runs_the_attempt_once(env: Env, tmp_path):
    [eid] = await env.submit("demo.record", {"dir": str(tmp_path)})
    async with inprocess.worker(env, ReplyLostOnFirstStart) as w, \
            inprocess.dispatcher(env) as d:
        assert await d.dispatch_round() == 1
        await env.all_terminal([eid], timeout=30)
        assert w.lost
    assert await status_of(env, eid) == "SUCCEEDED"
    assert [p.name for p in tmp_path.iterdir()] == [f"{eid}.1"]
    assert await env.pool.fetchval(
        "SELECT count(*) FROM execution_history WHERE execution_id = $1 "
        "AND to_status = 'RUNNING'", eid) == 1


async def test_an_attempt_its_worker_lost_track_of_is_released_as_orphaned(env: Env):
    async with inprocess.worker(env, orphan_grace_s=0) as w:
        [eid] = await env.submit("demo.noop")
        await scheduled_by_hand(env, eid, w.id)
        # Started in the database, never in the worker (its reply was lost for good).
        assert (await executions.sync(env.pool, w.id, starts=[Dispatch(eid, 1, 1, w.id)])).started
        await w._check_ownership()
    e = await executions.get(env.pool, eid)
    assert (e.status, e.attempt, e.reason) == ("REQUESTED", 2, "orphaned")


async def test_dispatches_a_worker_gives_back_do_not_count_against_max_dispatches(env: Env):
    [eid] = await env.submit("demo.noop")
    for n in range(1, 4):
        await env.pool.execute(
            "UPDATE executions SET status = 'SCHEDULED', worker_id = 'w', dispatches = $2 "
            "WHERE id = $1", eid, n)
        moves = await executions.release_dispatches(
            env.pool, [Dispatch(eid, 1, n, "w")], reason=Reason.REFUSED_MEMORY, actor="w")
        assert [(m.to_status, m.reason) for m in moves] == [("REQUESTED", "refused_memory")]
    e = await executions.get(env.pool, eid)
    assert (e.dispatches, e.unpublished) == (3, 3)
    # A counted release now is the first that counts: far from max_dispatches=2.
    await env.pool.execute("UPDATE executions SET status = 'SCHEDULED', dispatches = 4 "
                           "WHERE id = $1", eid)
    [moved] = await executions.release_dispatches(
        env.pool, [Dispatch(eid, 1, 4, "w")], reason=Reason.DEAD_LETTER_EXPIRED, actor="x",
        max_dispatches=2)
    assert moved.to_status == ExecutionStatus.REQUESTED


async def test_an_execution_whose_every_attempt_is_killed_ends_poison(env: Env):
    killed = AttemptError(kind=ErrorKind.KILLED, message="killed by SIGKILL")
    failed = AttemptError(kind=ErrorKind.ACTION_ERROR, message="boom")
    poison, mixed = await env.submit("demo.noop", n=2, max_attempts=2)
    for eid, errors in ((poison, [killed, killed]), (mixed, [failed, killed])):
        for attempt, error in enumerate(errors, start=1):
            await env.pool.execute(
                "UPDATE executions SET status = 'RUNNING', worker_id = 'w', dispatches = 1 "
                "WHERE id = $1", eid)
            await executions.sync(env.pool, "w", ends=[Ended(
                eid, attempt, 1, ExecutionStatus.FAILED, error=error, retry_delay_s=0)])
    p, m = await executions.get(env.pool, poison), await executions.get(env.pool, mixed)
    assert (p.status, p.reason, p.error["kind"]) == ("FAILED", "poison", "killed")
    assert (m.status, m.reason) == ("FAILED", "killed")
    listed = await executions.list_recent(env.pool, status=None, action=None, limit=10,
                                          reason="poison")
    assert [e.id for e in listed] == [poison]


class RecordsReadiness(Worker):
    """Notes, at each delivery, whether its actions were loaded and its children forked."""

    ready_at_delivery: list[bool]

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        children = self._children.pids if self._children is not None else []
        self.ready_at_delivery.append(
            "slow.noop" in self.offered and len(children) == self.settings.capacity)
        await super()._on_message(message)


async def test_no_delivery_reaches_a_worker_before_its_actions_are_loaded(env: Env):
    """Seed 004: a dispatch published the moment the worker's queue exists, while its
    slow action module is still loading, waits until the worker is ready for it."""
    [eid] = await env.submit("slow.noop")
    w = RecordsReadiness(inprocess.fast(
        WorkerSettings, name="slow", capacity=2, runtimes=["python"],
        action_modules=["tests.actions_slow_import"]), env.db, env.broker)
    w.ready_at_delivery = []
    starting = asyncio.create_task(w.start())

    async def queue_exists() -> bool:
        return any(q["name"] == broker.worker_queue(w.id) for q in await asyncio.to_thread(
            management, f"queues/{env.name}"))

    await wait_until(queue_exists, timeout=30, interval=0.005, what="the worker's queue")
    await scheduled_by_hand(env, eid, w.id)
    await _publish_to(env, w.id, Dispatch(eid, 1, 1, w.id))
    await starting
    try:
        await env.all_terminal([eid], timeout=30)
    finally:
        await w.shutdown()
    assert w.ready_at_delivery == [True]
    e = await executions.get(env.pool, eid)
    assert (e.status, e.result) == ("SUCCEEDED", "ran")


async def _publish_to(env: Env, worker_id: str, d: Dispatch) -> None:
    connection = await broker.connect(env.broker, BrokerRole.ADMIN, "vigil-tests publish")
    try:
        channel = await connection.channel()
        body = DispatchMessage.of([d]).model_dump_json().encode()
        await channel.default_exchange.publish(aio_pika.Message(body),
                                               routing_key=broker.worker_queue(worker_id))
    finally:
        await connection.close()


async def test_deliveries_that_arrive_together_start_in_one_statement(env: Env):
    def written(what: str) -> tuple[float, float]:
        labels = {"write": what}
        return (REGISTRY.get_sample_value("vigil_write_batch_size_count", labels) or 0,
                REGISTRY.get_sample_value("vigil_write_batch_size_sum", labels) or 0)

    ids = await env.submit("demo.noop", n=16)
    before = written("sync")
    async with inprocess.worker(env, capacity=16), inprocess.dispatcher(env) as d:
        assert await d.dispatch_round() == 16
        await env.all_terminal(ids, timeout=30)
    statements, rows = (a - b for a, b in zip(written("sync"), before, strict=True))
    assert rows == 32  # 16 starts and 16 ends
    assert statements < 16, "each start or end was written with a statement of its own"

"""Submit, dispatch, run and record, end to end on the real servers."""

import uuid

import aio_pika

from common import broker
from common.config import BrokerRole
from common.db import executions
from common.models import Dispatch, DispatchMessage
from common.state_machine import ExecutionStatus
from tests.harness import Env, wait_until


async def test_500_executions_over_2_workers_all_succeed(env: Env):
    env.executor()
    env.worker("w1", capacity=8)
    env.worker("w2", capacity=8)
    await env.live_workers(2)
    ids = await env.submit("demo.noop", n=500)
    counts = await env.all_terminal(ids, timeout=180)
    assert counts == {ExecutionStatus.SUCCEEDED: 500}
    per_worker = await env.pool.fetch(
        "SELECT worker_id, count(*) AS n FROM executions GROUP BY worker_id")
    assert len(per_worker) == 2 and all(r["n"] > 50 for r in per_worker)
    # Each ran exactly once: one attempt, one dispatch, one RUNNING in the history.
    assert await env.pool.fetchval(
        "SELECT count(*) FROM executions WHERE attempt <> 1 OR dispatches <> 1") == 0
    assert await env.pool.fetchval(
        "SELECT count(*) FROM execution_history WHERE to_status = 'RUNNING'") == 500


async def test_python_result_and_shell_output_round_trip(env: Env):
    env.executor()
    env.worker("w1")
    await env.live_workers(1)
    [add] = await env.submit("demo.add", {"a": 2, "b": 40})
    [sh] = await env.submit("shell", {"argv": ["sh", "-c", "echo out; echo err >&2"]})
    await env.all_terminal([add, sh], timeout=30)
    a = await executions.get(env.pool, add)
    s = await executions.get(env.pool, sh)
    assert (a.status, a.result, a.reason) == (ExecutionStatus.SUCCEEDED, {"sum": 42}, "succeeded")
    assert s.result == {"exit_code": 0, "stdout": "out\n", "stderr": "err\n"}
    history = [(h.from_status, h.to_status) for h in await executions.history(env.pool, add)]
    assert history == [(None, "REQUESTED"), ("REQUESTED", "SCHEDULED"),
                       ("SCHEDULED", "RUNNING"), ("RUNNING", "SUCCEEDED")]


async def test_failures_are_recorded_and_the_worker_keeps_working(env: Env):
    env.executor()
    env.worker("w1", capacity=2)
    await env.live_workers(1)
    [raises] = await env.submit("demo.fail", {"message": "boom"}, max_attempts=1)
    [exits] = await env.submit("shell", {"argv": ["sh", "-c", "exit 7"]}, max_attempts=1)
    [missing] = await env.submit("shell", {"argv": ["/no/such/binary"]})
    [crash] = await env.submit("demo.crash", max_attempts=1)
    await env.all_terminal([raises, exits, missing, crash], timeout=30)
    r = await executions.get(env.pool, raises)
    assert r.status == ExecutionStatus.FAILED
    assert (r.error["type"], r.error["message"]) == ("ValueError", "boom")
    assert "Traceback" in r.error["traceback"]
    e = await executions.get(env.pool, exits)
    assert (e.status, e.error["kind"], e.error["exit_code"]) == ("FAILED", "exit_code", 7)
    m = await executions.get(env.pool, missing)
    # A missing command fails the same way every time: not retried.
    assert (m.status, m.error["kind"], m.attempt) == ("FAILED", "command_not_found", 1)
    c = await executions.get(env.pool, crash)
    assert (c.status, c.error["kind"]) == ("FAILED", "killed")
    [after] = await env.submit("demo.add", {"a": 1, "b": 1})
    assert await env.all_terminal([after], timeout=30) == {ExecutionStatus.SUCCEEDED: 1}


async def test_failed_attempts_are_retried_with_backoff_until_max_attempts(env: Env):
    env.executor()
    env.worker("w1")
    await env.live_workers(1)
    [eid] = await env.submit("demo.fail", max_attempts=3)
    await env.all_terminal([eid], timeout=30)
    e = await executions.get(env.pool, eid)
    assert (e.status, e.attempt, e.reason) == (ExecutionStatus.FAILED, 3, "action_error")
    runs = await env.pool.fetchval(
        "SELECT count(*) FROM execution_history WHERE execution_id = $1 "
        "AND to_status = 'RUNNING'", eid)
    assert runs == 3


async def test_a_retry_resumes_from_the_last_checkpoint(env: Env):
    env.executor()
    env.worker("w1")
    await env.live_workers(1)
    [eid] = await env.submit("demo.steps", {"total": 5, "fail_at": 3})
    await env.all_terminal([eid], timeout=30)
    e = await executions.get(env.pool, eid)
    assert e.status == ExecutionStatus.SUCCEEDED
    assert e.result == {"done": 5, "resumed_from": 3, "attempt": 2}


async def test_bad_messages_in_a_worker_queue_are_rejected_and_it_keeps_consuming(env: Env):
    env.executor()
    w = env.worker("w1")
    [worker_id] = await env.live_workers(1)
    # As the administrator: neither Vigil user may publish to a worker queue directly.
    connection = await broker.connect(env.broker, BrokerRole.ADMIN, "vigil-tests")
    try:
        channel = await connection.channel()
        stale = DispatchMessage.of([Dispatch(uuid.uuid4(), 1, 1, worker_id)]).model_dump_json()
        for body in [b"not json", b'{"v": 2}', stale.encode()]:
            await channel.default_exchange.publish(
                aio_pika.Message(body), routing_key=broker.worker_queue(worker_id))
    finally:
        await connection.close()
    [eid] = await env.submit("demo.add", {"a": 1, "b": 2})
    assert await env.all_terminal([eid], timeout=30) == {ExecutionStatus.SUCCEEDED: 1}
    assert w.popen.poll() is None

    async def set_aside() -> str | None:
        text = w.log()
        return text if "set aside malformed" in text and "set aside stale" in text else None

    await wait_until(set_aside, timeout=10, what="both set aside and logged")


async def test_two_executors_on_one_backlog_dispatch_each_execution_once(env: Env):
    ids = await env.submit("demo.noop", n=400)
    env.executor("e1")
    env.executor("e2")
    env.worker("w1", capacity=8)
    env.worker("w2", capacity=8)
    counts = await env.all_terminal(ids, timeout=180)
    assert counts == {ExecutionStatus.SUCCEEDED: 400}
    dispatched_by = await env.pool.fetch(
        "SELECT actor, count(*) AS n FROM execution_history WHERE to_status = 'SCHEDULED' "
        "GROUP BY actor")
    assert sum(r["n"] for r in dispatched_by) == 400
    assert await env.pool.fetchval(
        "SELECT count(*) FROM executions WHERE dispatches <> 1") == 0


async def test_a_worker_never_runs_more_than_its_capacity(env: Env):
    env.executor()
    env.worker("w1", capacity=3)
    await env.live_workers(1)
    await env.submit("demo.sleep", {"seconds": 0.3}, n=12)
    peak = 0

    async def sample():
        nonlocal peak
        running = await env.pool.fetchval(
            "SELECT count(*) FROM executions WHERE status = 'RUNNING'")
        peak = max(peak, running)
        done = await env.pool.fetchval(
            "SELECT count(*) FROM executions WHERE status = 'SUCCEEDED'")
        return done == 12

    await wait_until(sample, timeout=60, interval=0.05, what="all 12 done")
    assert 1 <= peak <= 3


async def test_execution_ids_are_time_ordered_uuid7(env: Env):
    first = await env.submit("demo.noop", n=3)
    made_by = await env.pool.fetchval("SELECT clock_timestamp()")  # after the ids were

    async def clock_moved_on() -> bool:  # ids carry milliseconds
        return await env.pool.fetchval(
            "SELECT clock_timestamp() > $1::timestamptz + interval '1 ms'", made_by)

    await wait_until(clock_moved_on, timeout=5, interval=0.002, what="the clock to move on")
    later = await env.submit("demo.noop", n=3)
    assert all(uuid.UUID(str(i)).version == 7 for i in first + later)
    assert max(str(i) for i in first) < min(str(i) for i in later)
    # The first 48 bits are the Unix milliseconds the row was made at.
    drift_ms = await env.pool.fetchval(
        "SELECT max(abs(('x' || left(replace(id::text, '-', ''), 12))::bit(48)::bigint"
        " - extract(epoch FROM created_at) * 1000)) FROM executions")
    assert drift_ms < 1000, drift_ms

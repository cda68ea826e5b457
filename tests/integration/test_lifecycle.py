"""Cancel, retry and deadlines, on the real servers."""

import asyncio
import time

from common.db import executions
from common.models import ExecutionStatus
from tests.harness import Env, wait_until


async def status_of(env: Env, eid) -> str:
    return await env.pool.fetchval("SELECT status FROM executions WHERE id = $1", eid)


async def test_cancel_works_in_every_non_terminal_state(env: Env):
    # REQUESTED: no worker offers it.
    [requested] = await env.submit("nobody.offers.this")
    assert env.cli("cancel", str(requested)).returncode == 0
    assert await status_of(env, requested) == "CANCELLED"
    # SCHEDULED: put there by hand, as an executor would.
    [scheduled] = await env.submit("demo.noop")
    await env.pool.execute("UPDATE executions SET status = 'SCHEDULED', worker_id = 'w-x', "
                           "dispatches = 1 WHERE id = $1", scheduled)
    assert env.cli("cancel", str(scheduled)).returncode == 0
    assert await status_of(env, scheduled) == "CANCELLED"
    # Terminal: refused, exit 1, unchanged.
    again = env.cli("cancel", str(scheduled))
    assert again.returncode == 1 and "already CANCELLED" in again.stderr


async def test_cancelling_a_running_execution_kills_its_child_within_a_second(env: Env):
    env.executor()
    env.worker("w1")
    await env.live_workers(1)
    marker = env.tmp / "still-running"
    [eid] = await env.submit("shell", {"argv": [
        "sh", "-c", f"sleep 2; touch {marker}"]})

    async def running() -> bool:
        return await status_of(env, eid) == "RUNNING"

    await wait_until(running, timeout=30, what="RUNNING")
    began = time.monotonic()
    result = env.cli("cancel", str(eid))
    assert result.returncode == 0 and "was RUNNING" in result.stdout
    # The child would touch the marker at 2 s; a second after it should have, it hasn't.
    await asyncio.sleep(max(0.0, 3.0 - (time.monotonic() - began)))
    assert not marker.exists(), "the cancelled child kept running"
    e = await executions.get(env.pool, eid)
    assert (e.status, e.reason) == (ExecutionStatus.CANCELLED, "cancelled")


async def test_retry_runs_a_failed_execution_again_as_a_new_attempt(env: Env):
    env.executor()
    env.worker("w1")
    await env.live_workers(1)
    [eid] = await env.submit("demo.fail", max_attempts=1)
    await env.all_terminal([eid], timeout=30)
    result = env.cli("retry", str(eid))
    assert result.returncode == 0 and "attempt 2" in result.stdout
    await env.all_terminal([eid], timeout=30)
    e = await executions.get(env.pool, eid)
    assert (e.status, e.attempt) == (ExecutionStatus.FAILED, 2)
    not_yet = env.cli("retry", str((await env.submit("nobody.offers.this"))[0]))
    assert not_yet.returncode == 1 and "only FAILED, TIMED_OUT or CANCELLED" in not_yet.stderr


async def test_an_attempt_past_its_start_to_close_timeout_is_timed_out_and_killed(env: Env):
    env.executor()
    env.worker("w1")
    await env.live_workers(1)
    marker = env.tmp / "finished"
    [eid] = await env.submit("shell", {"argv": ["sh", "-c", f"sleep 4; touch {marker}"]},
                             timeout_s=1)
    await env.all_terminal([eid], timeout=30)
    e = await executions.get(env.pool, eid)
    assert (e.status, e.reason) == (ExecutionStatus.TIMED_OUT, "start_to_close_timeout")
    await asyncio.sleep(4)  # past when the child would have finished
    assert not marker.exists(), "the timed-out child kept running"


async def test_an_execution_no_worker_takes_fails_after_the_queue_timeout(env: Env):
    env.executor(VIGIL_EXECUTOR_QUEUE_TIMEOUT_S="1")
    [eid] = await env.submit("nobody.offers.this")
    await env.all_terminal([eid], timeout=30)
    e = await executions.get(env.pool, eid)
    assert (e.status, e.reason, e.error["kind"]) == (ExecutionStatus.FAILED, "no_worker",
                                                     "no_worker")


async def test_submit_wait_exits_0_on_success_and_1_on_failure(env: Env):
    env.executor()
    env.worker("w1")
    await env.live_workers(1)
    ok = env.cli("submit", "demo.add", "-p", "a=1", "-p", "b=2", "--wait")
    assert ok.returncode == 0 and "SUCCEEDED" in ok.stdout
    bad = env.cli("submit", "demo.fail", "--max-attempts", "1", "--wait")
    assert bad.returncode == 1 and "FAILED" in bad.stdout

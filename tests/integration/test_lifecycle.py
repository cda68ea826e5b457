"""Cancel, retry and deadlines, on the real servers."""

import os
import time

from common.db import executions
from common.state_machine import ExecutionStatus
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


async def sleeper_pid(env: Env, eid, pidfile) -> int:
    """Wait until the shell action is RUNNING and has written its pid."""

    async def started() -> int | None:
        if await status_of(env, eid) == "RUNNING" and pidfile.exists():
            text = pidfile.read_text().strip()
            return int(text) if text else None
        return None

    return await wait_until(started, timeout=30, what="the child to start")


async def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_cancelling_a_running_execution_kills_its_child_within_a_second(env: Env):
    env.executor()
    env.worker("w1")
    await env.live_workers(1)
    pidfile = env.tmp / "pid"
    [eid] = await env.submit("shell", {"argv": ["sh", "-c", f"echo $$ > {pidfile}; exec sleep 60"]})
    pid = await sleeper_pid(env, eid, pidfile)
    began = time.monotonic()
    result = env.cli("cancel", str(eid))
    assert result.returncode == 0 and "was RUNNING" in result.stdout
    await wait_until(lambda: gone(pid), timeout=5, interval=0.02, what="the child to die")
    assert time.monotonic() - began < 1.5
    e = await executions.get(env.pool, eid)
    # The worker's own outcome write, after the kill, was fenced out.
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
    pidfile = env.tmp / "pid"
    [eid] = await env.submit(
        "shell", {"argv": ["sh", "-c", f"echo $$ > {pidfile}; exec sleep 60"]}, timeout_s=1)
    pid = await sleeper_pid(env, eid, pidfile)
    await env.all_terminal([eid], timeout=30)
    e = await executions.get(env.pool, eid)
    assert (e.status, e.reason) == (ExecutionStatus.TIMED_OUT, "start_to_close_timeout")
    await wait_until(lambda: gone(pid), timeout=5, interval=0.05, what="the child to die")


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


async def test_each_failed_attempt_keeps_its_own_cause_in_the_history(env: Env):
    env.executor()
    env.worker("w1")
    await env.live_workers(1)
    [eid] = await env.submit("demo.fail", {"message": "boom"}, max_attempts=2)
    await env.all_terminal([eid], timeout=30)
    ended = await env.pool.fetch(
        "SELECT attempt, to_status, reason, error FROM execution_history "
        "WHERE execution_id = $1 AND from_status = 'RUNNING' ORDER BY id", eid)
    assert [(r["to_status"], r["reason"]) for r in ended] == [
        ("REQUESTED", "action_error"), ("FAILED", "action_error")]
    assert all(r["error"]["message"] == "boom" for r in ended)
    shown = env.cli("show", str(eid))
    assert shown.stdout.count("boom") >= 2


async def test_an_actions_defaults_apply_unless_the_submission_sets_its_own(env: Env):
    env.executor()
    env.worker("w1")
    await env.live_workers(1)
    [default] = await env.submit("demo.crash")  # @action("demo.crash", max_attempts=1)
    [overridden] = await env.submit("demo.crash", max_attempts=2)
    [other] = await env.submit("demo.noop")
    await env.all_terminal([default, overridden, other], timeout=30)
    d, o, n = [await executions.get(env.pool, e) for e in (default, overridden, other)]
    assert (d.status, d.max_attempts, d.attempt) == (ExecutionStatus.FAILED, 1, 1)
    assert (o.status, o.max_attempts, o.attempt) == (ExecutionStatus.FAILED, 2, 2)
    assert (n.max_attempts, n.timeout_s) == (3, 3600)

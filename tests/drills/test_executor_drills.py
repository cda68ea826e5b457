"""Executor failure drills: dying between commit and publish, SIGKILL and restart, and
two executors racing on one backlog."""

from __future__ import annotations

import asyncio
import signal
import time

from tests.drills.conftest import DrillResult
from tests.drills.support import check_promises, record_load
from tests.faults import EXIT_AFTER_COMMIT_CODE
from tests.harness import Env, wait_until


async def test_executor_killed_between_commit_and_publish_is_recovered_by_the_monitor(
    env: Env, drill_report: DrillResult
):
    env.extra_env["VIGIL_EXECUTOR_SCHEDULE_TO_START_TIMEOUT_S"] = "3"
    env.worker("w1", capacity=4)
    await env.live_workers(1)
    ids = await record_load(env, 5, seconds=0)
    doomed = env.start("exit-after-commit", name="doomed", module="tests.faults",
                       VIGIL_EXECUTOR_NAME="doomed")
    code = await asyncio.to_thread(doomed.wait, 30)
    died_at = time.monotonic()
    assert code == EXIT_AFTER_COMMIT_CODE, doomed.log()[-2000:]
    orphans = await env.pool.fetchval(
        "SELECT count(*) FROM executions WHERE id = ANY($1) AND status = 'SCHEDULED'", ids)
    assert orphans > 0  # committed SCHEDULED, never published
    env.executor("rescuer")
    await env.all_terminal(ids, timeout=30)
    recovery = time.monotonic() - died_at
    reasons = {r["reason"] for r in await env.pool.fetch(
        "SELECT reason FROM execution_history WHERE execution_id = ANY($1) "
        "AND from_status = 'SCHEDULED' AND to_status = 'REQUESTED'", ids)}
    drill_report.figures.update(await check_promises(env, ids))
    drill_report.figures.update(recovery_s=round(recovery, 2), orphans=orphans)
    assert reasons == {"schedule_to_start_timeout"}
    assert await env.pool.fetchval(
        "SELECT count(*) FROM executions WHERE id = ANY($1) AND status = 'SUCCEEDED'",
        ids) == 5


async def test_executor_sigkilled_and_restarted_mid_load_loses_nothing(
    env: Env, drill_report: DrillResult
):
    env.extra_env["VIGIL_EXECUTOR_SCHEDULE_TO_START_TIMEOUT_S"] = "5"
    first = env.executor("first")
    env.worker("w1", capacity=8)
    env.worker("w2", capacity=8)
    await env.live_workers(2)
    ids = await record_load(env, 300, seconds=0.05)

    async def some_done() -> bool:
        return await env.pool.fetchval(
            "SELECT count(*) FROM executions WHERE status = 'SUCCEEDED'") >= 50

    await wait_until(some_done, timeout=60, what="load under way")
    first.signal(signal.SIGKILL)
    killed_at = time.monotonic()
    await asyncio.sleep(1)  # the outage: nobody dispatches for a second
    env.executor("second")
    await env.all_terminal(ids, timeout=120)
    drill_report.figures.update(await check_promises(env, ids))
    drill_report.figures.update(recovery_s=round(time.monotonic() - killed_at, 2))
    assert await env.pool.fetchval(
        "SELECT count(*) FROM executions WHERE id = ANY($1) AND status <> 'SUCCEEDED'",
        ids) == 0


async def test_two_executors_racing_on_2000_dispatch_each_attempt_once(
    env: Env, drill_report: DrillResult
):
    ids = await record_load(env, 2000, seconds=0)
    began = time.monotonic()
    env.executor("e1")
    env.executor("e2")
    env.worker("w1", capacity=16)
    env.worker("w2", capacity=16)
    await env.all_terminal(ids, timeout=400)
    drill_report.figures.update(await check_promises(env, ids))
    by_executor = await env.pool.fetch(
        "SELECT actor, count(*) AS n FROM execution_history WHERE to_status = 'SCHEDULED' "
        "GROUP BY actor ORDER BY actor")
    drill_report.figures.update(
        recovery_s=round(time.monotonic() - began, 2),
        dispatches="/".join(str(r["n"]) for r in by_executor))
    assert sum(r["n"] for r in by_executor) == 2000
    assert await env.pool.fetchval(
        "SELECT count(*) FROM executions WHERE dispatches <> 1 OR attempt <> 1") == 0

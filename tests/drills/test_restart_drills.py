"""Restarts (seed 004): a retry after a SIGKILL resumes from its checkpoint, and a whole
deployment SIGKILLed and restarted again and again under load loses nothing, runs no
attempt twice at once and never meets a delivery with "no handler"."""

from __future__ import annotations

import asyncio
import signal
import time

from tests.drills.conftest import DrillResult
from tests.drills.support import check_promises, record_load, worker_id
from tests.harness import Env, Proc, wait_until

STEPS = 20
STEP_S = 0.25

EXECUTORS = 3
WORKERS = 6
STORMS = 5
STORM_EVERY_S = 10.0  # storms at 10, 20, ... 50 s of a 60 s load
ARRIVALS_PER_S = 10
NO_HANDLER = ("unknown_action", "no action named")


async def test_a_retry_after_a_sigkill_resumes_from_the_checkpoint_on_another_worker(
    env: Env, drill_report: DrillResult
):
    env.executor()
    victim = env.worker("victim", capacity=1)
    victim_id = await worker_id(env, "victim")
    [eid] = await env.submit("demo.steps", {"total": STEPS, "step_seconds": STEP_S})

    async def checkpointed() -> int | None:
        done = await env.pool.fetchval(
            "SELECT (checkpoint->>'done')::int FROM executions WHERE id = $1", eid)
        return done if done and done >= STEPS // 4 else None

    saved = await wait_until(checkpointed, timeout=30, interval=0.05,
                             what="a few steps checkpointed")
    killed_at = time.monotonic()
    victim.signal(signal.SIGKILL)
    env.worker("survivor", capacity=1)
    survivor_id = await worker_id(env, "survivor")

    async def rerunning() -> bool:
        return await env.pool.fetchval(
            "SELECT status = 'RUNNING' AND attempt = 2 FROM executions WHERE id = $1", eid)

    await wait_until(rerunning, timeout=30, interval=0.05, what="attempt 2 to run")
    recovery = time.monotonic() - killed_at
    await env.all_terminal([eid], timeout=60)
    row = await env.pool.fetchrow(
        "SELECT status, attempt, worker_id, result FROM executions WHERE id = $1", eid)
    drill_report.figures.update(await check_promises(env, [eid]))
    drill_report.figures.update(recovery_s=round(recovery, 2), saved_at_kill=saved,
                                resumed_from=row["result"]["resumed_from"])
    assert (row["status"], row["attempt"], row["worker_id"]) == \
        ("SUCCEEDED", 2, survivor_id), dict(row)
    assert row["result"]["done"] == STEPS
    # It resumed from what attempt 1 saved (at least what was saved when it was killed).
    assert row["result"]["resumed_from"] >= saved > 0
    # Attempt 1 ended with its worker (recorded as attempt 2 being REQUESTED).
    assert await env.pool.fetchval(
        "SELECT count(*) FROM execution_history WHERE execution_id = $1 "
        "AND from_status = 'RUNNING' AND reason = 'worker_lost' AND worker_id = $2",
        eid, victim_id) == 1


def _start_all(env: Env, storm: int) -> list[Proc]:
    """The deployment: each process named for its storm, so each keeps a log of its own."""
    return [*(env.executor(f"e{i}-s{storm}") for i in range(EXECUTORS)),
            *(env.worker(f"w{i}-s{storm}", capacity=2) for i in range(WORKERS))]


async def _steady_load(env: Env, ids: list, stop: asyncio.Event) -> None:
    """Submissions at a steady rate until told to stop, whatever is down meanwhile. A
    storm kills what runs: with five attempts none is killed on every one (poison)."""
    while not stop.is_set():
        ids.extend(await record_load(env, ARRIVALS_PER_S // 5, seconds=0.1, max_attempts=5))
        await asyncio.sleep(0.2)


async def test_the_whole_deployment_sigkilled_and_restarted_5_times_under_load(
    env: Env, drill_report: DrillResult
):
    # Restarted together, executors and workers wait a random moment of up to a second
    # before they connect (the shipped startup jitter), rather than all at once.
    env.extra_env["VIGIL_WORKER_STARTUP_JITTER_S"] = "1"
    env.extra_env["VIGIL_EXECUTOR_STARTUP_JITTER_S"] = "1"
    procs = _start_all(env, 0)
    await env.live_workers(WORKERS, timeout=60)
    ids: list = []
    stop = asyncio.Event()
    load = asyncio.create_task(_steady_load(env, ids, stop))
    began = time.monotonic()
    storms_at = []  # database time
    try:
        for storm in range(1, STORMS + 1):
            await asyncio.sleep(STORM_EVERY_S)  # the pace of the storms, not a wait for state
            for p in procs:
                p.signal(signal.SIGKILL)
            storms_at.append(await env.pool.fetchval("SELECT now()"))
            procs += _start_all(env, storm)
        await asyncio.sleep(STORM_EVERY_S)  # the load goes on through the last recovery
    finally:
        stop.set()
        await load
    load_s = time.monotonic() - began
    await env.all_terminal(ids, timeout=180)
    drained_s = time.monotonic() - began - load_s
    drill_report.figures.update(await check_promises(env, ids))

    no_handler = await env.pool.fetchval(
        "SELECT count(*) FROM execution_history WHERE execution_id = ANY($1) "
        "AND error->>'kind' = 'unknown_action'", ids)
    logged = [p.name for p in procs if any(s in p.log() for s in NO_HANDLER)]
    # Recovery: from each storm to the first execution that succeeds after it.
    recovery = max([await env.pool.fetchval(
        "SELECT extract(epoch FROM min(finished_at) - $2)::float8 FROM executions "
        "WHERE id = ANY($1) AND finished_at > $2", ids, at) for at in storms_at])
    outcomes = dict(await env.pool.fetch(
        "SELECT status, count(*) FROM executions WHERE id = ANY($1) GROUP BY status", ids))
    drill_report.figures.update(
        recovery_s=round(recovery, 2), drain_s=round(drained_s, 2), submitted=len(ids),
        storms=STORMS, load_s=round(load_s, 1), succeeded=outcomes.get("SUCCEEDED", 0),
        retried=await env.pool.fetchval(
            "SELECT count(*) FROM executions WHERE id = ANY($1) AND attempt > 1", ids))
    assert no_handler == 0 and not logged, f"no handler: {no_handler} attempts, logs {logged}"
    assert outcomes == {"SUCCEEDED": len(ids)}, outcomes
